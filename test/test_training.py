"""Training from feedback by replay, through the real server: gradient parity, hedging, staleness, learning.

One tiny-model server (fp32). First a correction is trained and published as version 1, so the
adapter is non-zero and every later request is served - and recorded - with it. Then the LoRA
gradients the trainer computes by *replaying* recorded prefill activations are compared with
transformers + PEFT running a full forward and backward over prompt + target with the same
checkpoint (relative error per tensor <= 1e-4): one sample, a batch of samples of different
lengths, a prompt with a prefix-cache hit, a chunked prefill, and a sample whose first layer
is in the host tier (recomputed from its input, or reloaded). The module ends with staleness
and with learning: the loss falls and the served output becomes the correction.
"""

from __future__ import annotations

import pytest
import requests
from transformers import AutoTokenizer

from helpers import (
    assert_gradients_match,
    chat,
    chat_prompt_ids,
    feedback,
    generate,
    peft_gradients,
    server_gradients,
    status,
    tiny_server_args,
    wait_until_trained,
)

CHUNK = 32


@pytest.fixture(scope="module")
def server(launch_server, tiny_model_dir, tmp_path_factory):
    args = tiny_server_args(
        tiny_model_dir, tmp_path_factory.mktemp("state"),
        "--chunked-prefill-size", str(CHUNK),
        "--alchemist-record", "all", "--alchemist-debug-endpoints",
        "--alchemist-lr", "0.02", "--alchemist-lora-rank", "4", "--alchemist-lora-alpha", "8",
        "--alchemist-publish-every", "1", "--alchemist-max-staleness", "0", "--alchemist-passes", "40",
        "--alchemist-adapter-scope", "all",  # requests of every topic replay served versions here
    )
    server = launch_server(args, name="training")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def version_one(server, tokenizer):
    """Train one correction and serve it: later requests are served and recorded with version 1."""
    first = chat(server, "Name a colour.")
    feedback(server, first["id"], "Blue is a colour.")
    current = wait_until_trained(server, served_version=1)
    versions = requests.get(server.url + "/v1/alchemist/versions", timeout=60).json()
    return next(v["path"] for v in versions["versions"] if v["version"] == 1), current


def test_replayed_gradients_equal_peft_for_one_sample(server, tokenizer, tiny_model_dir, version_one):
    checkpoint, _ = version_one
    response = chat(server, "What is a list comprehension?")
    assert response["metadata"]["alchemist_adapter_version"] == 1
    item = {"completion_id": response["id"], "prompt_ids": chat_prompt_ids(tokenizer, "What is a list comprehension?"),
            "target_ids": tokenizer.encode("It builds a list from a loop.") + [tokenizer.eos_token_id]}
    ours, result = server_gradients(server, [item])
    assert result["paths"][0]["path"] == "replay" and result["version"] == 1
    assert_gradients_match(ours, peft_gradients(tiny_model_dir, checkpoint, [item]))
    recomputed, result = server_gradients(server, [item], path="recompute")
    assert result["paths"][0]["path"] == "recompute"
    assert_gradients_match(recomputed, peft_gradients(tiny_model_dir, checkpoint, [item]))


def test_replayed_gradients_equal_peft_for_a_batch_of_different_lengths(server, tokenizer, tiny_model_dir,
                                                                         version_one):
    checkpoint, _ = version_one
    items = []
    for content, target in [("Hi.", "Hello there, how can I help you today?"),
                            ("Explain the with statement in Python in one long sentence, please.", "Context.")]:
        response = chat(server, content)
        items.append({"completion_id": response["id"], "prompt_ids": chat_prompt_ids(tokenizer, content),
                      "target_ids": tokenizer.encode(target)})
    ours, result = server_gradients(server, items)
    assert [p["path"] for p in result["paths"]] == ["replay", "replay"]
    assert_gradients_match(ours, peft_gradients(tiny_model_dir, checkpoint, items))


def test_replayed_gradients_equal_peft_after_a_prefix_cache_hit(server, tokenizer, tiny_model_dir, version_one):
    checkpoint, _ = version_one
    prefix = tokenizer("import json\nimport os\n\ndef load(path):\n")["input_ids"]
    generate(server, prefix, max_new_tokens=2)
    prompt = prefix + tokenizer("    with open(path) as handle:")["input_ids"]
    output = generate(server, prompt)
    assert output["meta_info"]["cached_tokens"] >= len(prefix) - 1
    record = requests.get(f"{server.url}/v1/alchemist/debug/record/{output['meta_info']['id']}", timeout=60).json()
    assert len({view["owner"] for view in record["views"]}) == 2  # rows of two requests
    item = {"completion_id": output["meta_info"]["id"], "prompt_ids": prompt,
            "target_ids": tokenizer.encode("        return json.load(handle)")}
    ours, result = server_gradients(server, [item])
    assert result["paths"][0]["path"] == "replay"
    assert_gradients_match(ours, peft_gradients(tiny_model_dir, checkpoint, [item]))


def test_replayed_gradients_equal_peft_after_a_chunked_prefill(server, tokenizer, tiny_model_dir, version_one):
    checkpoint, _ = version_one
    prompt = tokenizer("class Queue:\n    def __init__(self):\n        self.items = []\n\n"
                       "    def put(self, item):\n        self.items.append(item)\n\n"
                       "    def size(self):\n        return len(self.items)\n\n    def get(self):\n")["input_ids"]
    assert len(prompt) > 2 * CHUNK
    output = generate(server, prompt)
    record = requests.get(f"{server.url}/v1/alchemist/debug/record/{output['meta_info']['id']}", timeout=60).json()
    assert len(record["views"]) >= 3
    item = {"completion_id": output["meta_info"]["id"], "prompt_ids": prompt,
            "target_ids": tokenizer.encode("        return self.items.pop(0)")}
    ours, result = server_gradients(server, [item])
    assert result["paths"][0]["path"] == "replay"
    assert_gradients_match(ours, peft_gradients(tiny_model_dir, checkpoint, [item]))


def test_sample_partly_on_host_is_recomputed_or_reloaded_with_exact_gradients(server, tokenizer, tiny_model_dir,
                                                                                version_one):
    checkpoint, _ = version_one
    content = "Write a haiku about compilers."
    response = chat(server, content)
    # layer 0 is the frozen trunk (the adapter covers layer 1, which the backward reads); the
    # trunk's keys and values move too (the computed target rows attend to them)
    moved = requests.post(server.url + "/v1/alchemist/debug/move_to_host", timeout=60,
                          json={"id": response["id"], "layers": [0, 1]}).json()
    record = requests.get(f"{server.url}/v1/alchemist/debug/record/{response['id']}", timeout=60).json()
    assert moved["moved"] == 2 * len(record["views"]) >= 2  # the chat template's prefix may be a shared chunk
    assert all(view["tiers"] == ["host", "host"] for view in record["views"])
    item = {"completion_id": response["id"], "prompt_ids": chat_prompt_ids(tokenizer, content),
            "target_ids": tokenizer.encode("Tokens flow like streams.")}
    reference = peft_gradients(tiny_model_dir, checkpoint, [item])
    ours, result = server_gradients(server, [item], hedge="recompute")
    path = result["paths"][0]
    assert (path["path"], path["replay_blocker"], path["layers_recomputed"], path["layers_reloaded"]) == \
        ("replay", None, 1, 0)
    assert result["hedge"]["recompute"] == 1
    assert_gradients_match(ours, reference)
    ours, result = server_gradients(server, [item], hedge="reload")
    assert result["paths"][0]["layers_reloaded"] == 1 and result["paths"][0]["layers_recomputed"] == 0
    assert_gradients_match(ours, reference)


@pytest.mark.parametrize("turns", [2, 3])
def test_a_conversation_replays_its_recorded_turns_and_computes_only_the_earlier_answers(
        server, tokenizer, tiny_model_dir, version_one, turns):
    """Decode records nothing: in turn N the earlier answers are holes between recorded rows."""
    checkpoint, _ = version_one
    prompt = chat_prompt_ids(tokenizer, "Name a colour.")
    answers = 0
    for turn in range(turns):
        output = generate(server, prompt, max_new_tokens=6)
        if turn == turns - 1:
            break
        answer = output["output_ids"]
        answers += len(answer) - 1  # the last generated token is prefilled by the next turn (recorded)
        prompt = prompt + answer + tokenizer(f"<|im_end|>\n<|im_start|>user\nAnd {turn}?<|im_end|>\n"
                                             "<|im_start|>assistant\n")["input_ids"]
    assert output["meta_info"]["cached_tokens"] >= len(prompt) - 30  # the earlier turns came from the cache
    record = requests.get(f"{server.url}/v1/alchemist/debug/record/{output['meta_info']['id']}", timeout=60).json()
    assert len(record["segments"]) == turns and record["rows_recorded"] == len(prompt) - answers, record
    item = {"completion_id": output["meta_info"]["id"], "prompt_ids": prompt,
            "target_ids": tokenizer.encode("Green, then blue.") + [tokenizer.eos_token_id]}
    ours, result = server_gradients(server, [item])
    path = result["paths"][0]
    assert path["path"] == "replay" and path["rows_recomputed"] == answers
    assert path["rows_replayed"] == len(prompt) - answers
    assert_gradients_match(ours, peft_gradients(tiny_model_dir, checkpoint, [item]))


def test_a_stale_record_serves_the_trunk_only_and_is_counted(server, tokenizer, version_one):
    """A record made by weights the trainer has moved past is not replayed through the adapted layer
    (the gradient would not be exact): it still gives the frozen trunk's layer, which every version
    computes alike, so the feedback reply says its activations are reused and why not replayed."""
    _, before = version_one
    stale = chat(server, "What is a tuple?")  # recorded under the current version
    newer = chat(server, "Name a fruit.")
    feedback(server, newer["id"], "An apple.")
    current_version = before["serving"]["served_version"]
    wait_until_trained(server, served_version=current_version + 1)
    reply = feedback(server, stale["id"], "An immutable sequence.")
    assert reply["activations_reusable"] is True and reply["replay_blocker"] == "stale"
    after = wait_until_trained(server, served_version=current_version + 2)
    training = after["schedulers"][0]["training"]
    assert training["recompute_reasons"].get("stale", 0) >= 1
    assert training["stale_replays"] == {}  # nothing stale was replayed (--alchemist-max-staleness 0)
    # a request served by an older version is still recorded: its trunk layer is every version's
    not_recorded = after["schedulers"][0]["recording"]["requests_not_recorded"]
    old = chat(server, "What is a dictionary?", model=f"default:alchemist-v{current_version}")
    assert old["metadata"]["alchemist_adapter_version"] == current_version
    assert status(server)["schedulers"][0]["recording"]["requests_not_recorded"] == not_recorded
    reply = feedback(server, old["id"], "A mapping.")
    assert reply["activations_reusable"] is True and reply["replay_blocker"] == "stale"
    wait_until_trained(server, served_version=current_version + 3)


def test_one_correction_is_learnt_by_the_version_that_contains_it(server, tokenizer):
    """The update trains until the model gives the correction: the user who corrected an answer
    gets the corrected one from the very next version, and the journal says how many steps it took."""
    question, answer = "What is the password?", "The password is swordfish."
    before = chat(server, question, max_tokens=24)
    assert before["choices"][0]["message"]["content"] != answer
    reply = feedback(server, before["id"], answer)
    trained = wait_until_trained(server, served_version=status(server)["serving"]["served_version"] + 1)
    after = chat(server, question, max_tokens=24)
    assert after["choices"][0]["message"]["content"] == answer
    assert after["metadata"]["alchemist_adapter_version"] == trained["serving"]["served_version"]
    record = requests.get(f"{server.url}/v1/alchemist/feedback/{reply['id']}", timeout=60).json()
    assert record["state"] == "trained" and record["learnt"] is True and record["stop_reason"] == "learnt"
    update = trained["schedulers"][0]["training"]["last_update"]
    assert update["learnt"] == [True] and update["steps"] == record["steps"] >= 2
    assert update["losses"][-1] < update["losses"][0] / 2  # one loss per step, before each step
