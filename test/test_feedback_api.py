"""The feedback API and the admin endpoints through the real server: errors, auth, the loop, rollback.

One tiny-model server with SGLang's ``--api-key`` (feedback and completions need it) and
``--alchemist-admin-key`` (admin endpoints need it, in ``X-Alchemist-Admin-Key`` since the
API key occupies ``Authorization``).
"""

from __future__ import annotations

import time

import pytest
import requests
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import tiny_server_args

API_KEY, ADMIN_KEY = "user-key", "admin-key"
USER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {**USER, "X-Alchemist-Admin-Key": ADMIN_KEY}
MAX_BYTES = 2000


@pytest.fixture(scope="module")
def server(launch_server, tiny_model_dir, tmp_path_factory):
    args = tiny_server_args(
        tiny_model_dir, tmp_path_factory.mktemp("state"),
        "--api-key", API_KEY, "--alchemist-admin-key", ADMIN_KEY,
        "--alchemist-lr", "0.02", "--alchemist-batch-samples", "1",
        "--alchemist-max-feedback-bytes", str(MAX_BYTES),
    )
    server = launch_server(args, name="feedback-api")
    yield server
    server.stop()


def chat(server, content: str, model: str = "default") -> dict:
    response = requests.post(server.url + "/v1/chat/completions", headers=USER, timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0,
    })
    assert response.status_code == 200, response.text
    return response.json()


def post_feedback(server, body, headers=USER) -> requests.Response:
    if isinstance(body, dict):
        return requests.post(server.url + "/v1/feedback", json=body, headers=headers, timeout=120)
    return requests.post(server.url + "/v1/feedback", data=body, headers={**headers, "Content-Type": "application/json"},
                         timeout=120)


def admin_get(server, path: str) -> dict:
    response = requests.get(server.url + path, headers=ADMIN, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def wait_idle_at(server, version: int | None, timeout_s: float = 120) -> dict:
    """Wait until nothing is left to train and ``version`` (None: whatever was published) is served."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = admin_get(server, "/v1/alchemist/status")
        training = status["schedulers"][0]["training"]
        idle = training["queue_depth"] == 0 and not training["step_in_progress"]
        published = status["serving"]["served_version"] == status["schedulers"][0]["versions"]["current"]
        if idle and published and version in (None, status["serving"]["served_version"]):
            return status
        time.sleep(0.3)
    raise AssertionError(f"not serving version {version}: {status['serving']} {training}")


def assert_openai_error(response: requests.Response, status_code: int, fragment: str) -> None:
    assert response.status_code == status_code, response.text
    error = response.json()["error"]
    assert error["code"] == status_code and fragment in error["message"], error


def test_bad_feedback_gets_its_status_code_and_the_server_keeps_serving(server):
    served = chat(server, "Say something.")
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"id": served["id"]}, 400, "'type' must be one of"),
        ({"id": served["id"], "type": "love"}, 400, "'type' must be one of"),
        ({"id": served["id"], "type": "correction"}, 400, "needs a non-empty 'completion'"),
        ({"id": served["id"], "type": "accept", "weight": -1}, 400, "'weight' must be a number > 0"),
        ({"id": served["id"], "type": "accept", "weight": "heavy"}, 400, "'weight' must be a number > 0"),
        ({"id": served["id"], "type": "accept", "colour": "red"}, 400, "unknown field(s): colour"),
        ({"id": 42, "type": "accept"}, 400, "'id' must be"),
        ({"id": served["id"], "type": "accept", "prompt": "x"}, 400, "not both"),
        ({"prompt": "x"}, 400, "non-empty 'completion'"),
        ({"id": "no-such-completion", "type": "accept"}, 404, "no served response"),
        ({"id": served["id"], "type": "correction", "completion": "x" * (MAX_BYTES + 10)}, 413, "limit"),
    ]
    for body, status_code, fragment in cases:
        assert_openai_error(post_feedback(server, body), status_code, fragment)
    assert post_feedback(server, {"id": served["id"], "type": "accept"}, headers={}).status_code == 401
    assert chat(server, "Still there?")["choices"][0]["message"]["content"] is not None
    status = admin_get(server, "/v1/alchemist/status")
    assert status["schedulers"][0]["journal"]["total"] == 0  # nothing invalid was journaled


def test_duplicate_feedback_is_idempotent_when_identical_and_409_otherwise(server):
    served = chat(server, "Tell me a number.")
    body = {"id": served["id"], "type": "correction", "completion": "Seven."}
    first = post_feedback(server, body)
    assert first.status_code == 202
    again = post_feedback(server, body)
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["duplicate"] is True
    assert_openai_error(post_feedback(server, {**body, "completion": "Eight."}), 409, "already has a different")
    assert first.json()["activations_reusable"] is True  # recorded while served: replayed


def test_admin_endpoints_refuse_without_the_admin_key(server):
    for method, path in [("get", "/v1/alchemist/status"), ("get", "/v1/alchemist/versions"),
                         ("post", "/v1/alchemist/rollback"), ("post", "/v1/alchemist/pause"),
                         ("post", "/v1/alchemist/resume"), ("get", "/v1/alchemist/metrics")]:
        denied = getattr(requests, method)(server.url + path, headers=USER, timeout=60)
        assert_openai_error(denied, 401, "admin key")
        wrong = getattr(requests, method)(server.url + path, timeout=60,
                                          headers={**USER, "X-Alchemist-Admin-Key": "wrong"})
        assert wrong.status_code == 401
    assert requests.get(server.url + "/v1/alchemist/versions", headers=ADMIN, timeout=60).status_code == 200


def test_loop_versions_rollback_and_peft_checkpoints_reproduce_server_outputs(server, tiny_model_dir):
    question = "What is my favourite animal?"
    start = wait_idle_at(server, None)
    base_version = start["serving"]["served_version"]
    outputs = {base_version: chat(server, question)["choices"][0]["message"]["content"]}
    for offset, answer in enumerate(["My favourite animal is the otter.", "It is the heron, obviously."], 1):
        served = chat(server, question)
        assert post_feedback(server, {"id": served["id"], "type": "correction", "completion": answer}).status_code == 202
        wait_idle_at(server, base_version + offset)
        response = chat(server, question)
        assert response["metadata"]["alchemist_adapter_version"] == base_version + offset
        outputs[base_version + offset] = response["choices"][0]["message"]["content"]
    first, second = base_version + 1, base_version + 2
    assert len(set(outputs.values())) == 3, outputs  # each version answers differently

    # a checkpoint loaded by PEFT generates what the server generated with that version
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    versions = admin_get(server, "/v1/alchemist/versions")
    checkpoint = next(v["path"] for v in versions["versions"] if v["version"] == second)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      checkpoint).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    with torch.no_grad():
        generated = model.generate(torch.tensor([list(prompt)]), do_sample=False, max_new_tokens=8,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(generated[0, len(prompt):], skip_special_tokens=True) == outputs[second]

    # rollback to the first version brings its outputs back; training continues from it
    rolled = requests.post(server.url + "/v1/alchemist/rollback", json={"version": first}, headers=ADMIN, timeout=120)
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["served_version"] == first
    response = chat(server, question)
    assert response["choices"][0]["message"]["content"] == outputs[first]
    assert response["metadata"]["alchemist_adapter_version"] == first
    versions = admin_get(server, "/v1/alchemist/versions")
    assert versions["current"] == first and second not in versions["lineage"]
    served = chat(server, question)
    post_feedback(server, {"id": served["id"], "type": "accept"})
    wait_idle_at(server, second + 1)
    versions = admin_get(server, "/v1/alchemist/versions")
    assert next(v for v in versions["versions"] if v["version"] == second + 1)["parent"] == first

    # the base model stays reachable by name: it answers like plain transformers without adapter
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        generated = base_model.generate(torch.tensor([list(prompt)]), do_sample=False, max_new_tokens=8,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    base_answer = tokenizer.decode(generated[0, len(prompt):], skip_special_tokens=True)
    response = chat(server, question, model="default:base")
    assert response["choices"][0]["message"]["content"] == base_answer
    assert response["metadata"]["alchemist_adapter_version"] == 0
    assert_openai_error(requests.post(server.url + "/v1/alchemist/rollback", json={"version": 999},
                                      headers=ADMIN, timeout=60), 404, "unknown adapter version")
    # a version without a checkpoint (never published, or pruned) is refused with the reason
    missing = requests.post(server.url + "/v1/chat/completions", headers=USER, timeout=60, json={
        "model": "default:alchemist-v999", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert missing.status_code == 400, missing.text
    assert "adapter version 999 (alchemist-v999) is not available" in missing.json()["message"]


def test_pause_stops_training_and_resume_restarts_it(server):
    before = wait_idle_at(server, None)
    version = before["serving"]["served_version"]
    assert requests.post(server.url + "/v1/alchemist/pause", headers=ADMIN, timeout=60).json()["paused"] is True
    served = chat(server, "Pause test.")
    assert post_feedback(server, {"id": served["id"], "type": "accept"}).status_code == 202
    time.sleep(3)
    paused = admin_get(server, "/v1/alchemist/status")
    assert paused["schedulers"][0]["training"]["queue_depth"] == 1
    assert paused["serving"]["served_version"] == version
    assert chat(server, "Serving goes on while paused.")["choices"]
    assert requests.post(server.url + "/v1/alchemist/resume", headers=ADMIN, timeout=60).json()["paused"] is False
    wait_idle_at(server, version + 1)


def test_external_exchange_and_reject_are_trained(server):
    version = wait_idle_at(server, None)["serving"]["served_version"]
    external = post_feedback(server, {"messages": [{"role": "user", "content": "Capital of Utopia?"}],
                                      "completion": "Amaurot."})
    assert external.status_code == 202
    assert external.json()["activations_reusable"] is False
    assert external.json()["replay_blocker"] == "not_served_here"
    wait_idle_at(server, version + 1)
    served = chat(server, "Say something rude.")
    rejected = post_feedback(server, {"id": served["id"], "type": "reject"})
    assert rejected.status_code == 202 and rejected.json()["objective"] == "unlikelihood"
    status = wait_idle_at(server, version + 2)
    journal = status["schedulers"][0]["journal"]
    assert journal["queued"] == 0 and journal["dropped"] == 0 and journal["trained"] == journal["total"]


def test_metrics_are_exported_in_prometheus_format(server):
    response = requests.get(server.url + "/v1/alchemist/metrics", headers=ADMIN, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ["sglang_alchemist_optimizer_steps_total", "sglang_alchemist_tokens_trained_total",
                 "sglang_alchemist_recent_loss", "sglang_alchemist_queue_depth", "sglang_alchemist_reuse_ratio",
                 "sglang_alchemist_served_adapter_version", "sglang_alchemist_slo_attainment",
                 "sglang_alchemist_ttft_attainment"]:
        assert name in text, name
    steps = next(line for line in text.splitlines() if line.startswith("sglang_alchemist_optimizer_steps_total{"))
    assert float(steps.split()[-1]) >= 5
