"""The feedback API and the admin endpoints through the real server: errors, auth, the loop, rollback.

One tiny-model server with SGLang's ``--api-key`` (feedback and completions need it) and
``--alchemist-admin-key`` (admin endpoints need it, in ``X-Alchemist-Admin-Key`` since the
API key occupies ``Authorization``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from peft import PeftModel
from starlette.requests import Request
from transformers import AutoModelForCausalLM, AutoTokenizer

from sglang_alchemist.api import routes
from sglang_alchemist.api.feedback import FeedbackError, FeedbackService, feedback_route, read_body
from sglang_alchemist.config import AlchemistConfig
from sglang_alchemist.feedback.journal import Journal, storage_failure

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
        "--alchemist-lr", "0.02",
        "--alchemist-max-feedback-bytes", str(MAX_BYTES),
    )
    server = launch_server(args, name="feedback-api")
    yield server
    server.stop()


def chat(server, content: str, model: str = "default", logprobs: bool = False) -> dict:
    response = requests.post(server.url + "/v1/chat/completions", headers=USER, timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0,
        **({"logprobs": True} if logprobs else {}),
    })
    assert response.status_code == 200, response.text
    return response.json()


def stream_chat(server, content: str) -> dict:
    """A streamed chat: its headers, id and the metadata of the chunk that finishes the choice."""
    response = requests.post(server.url + "/v1/chat/completions", headers=USER, timeout=120, stream=True, json={
        "model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0,
        "stream": True,
    })
    assert response.status_code == 200, response.text
    completion_id, metadata = None, None
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        completion_id = completion_id or chunk.get("id")
        if any(choice.get("finish_reason") for choice in chunk.get("choices", [])):
            metadata = chunk.get("metadata")
    return {"headers": response.headers, "id": completion_id, "finish_metadata": metadata}


def signature(response: dict) -> tuple[str, tuple[float, ...]]:
    """A served answer's text and its tokens' log-probabilities (rounded): what tells versions apart.

    The random tiny model often answers two versions with the same few characters ("S"), so the
    text alone cannot show that a new version is served; its log-probabilities always move.
    """
    choice = response["choices"][0]
    logprobs = tuple(round(token["logprob"], 3) for token in choice["logprobs"]["content"])
    return choice["message"]["content"], logprobs


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
        # the journal too: an accepted feedback can be on its way to the trainer, in no queue yet
        idle = training["queue_depth"] == 0 and not training["step_in_progress"] and \
            status["schedulers"][0]["journal"]["queued"] == 0
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
        ({"id": "\u0000\u001b[0m\n", "type": "accept"}, 404, "no served response"),  # control characters
        ({"id": served["id"], "type": "correction", "completion": "x" * (MAX_BYTES + 10)}, 413, "limit"),
        # text that is not valid Unicode: a lone UTF-16 surrogate, named by its field
        ({"id": served["id"], "type": "correction", "completion": "fine \ud800"}, 400,
         "'completion' contains a lone UTF-16 surrogate"),
        ({"messages": [{"role": "user", "content": "hi \udfff"}], "completion": "x"}, 400,
         "'messages[0].content' contains a lone UTF-16 surrogate"),
        ({"prompt": "\ud800", "completion": "x"}, 400, "'prompt' contains a lone UTF-16 surrogate"),
        ({"id": "\udc00" + served["id"], "type": "accept"}, 400, "'id' contains a lone UTF-16 surrogate"),
        ({"prompt": "x", "completion": "y", "\ud800": 1}, 400, "a field name contains a lone UTF-16 surrogate"),
        # JSON the parser refuses in other ways than a syntax error
        (b'{"prompt": "a\x01b", "completion": "c"}', 400, "not valid JSON"),  # an unescaped control char
        (b"[" * 1900, 400, "nested too deeply"),
        ({"id": served["id"], "type": "accept", "weight": 10**400}, 400, "'weight' must be a number > 0"),
        (b"\xff\xfe{}", 400, "not valid JSON"),
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
        non_ascii = getattr(requests, method)(server.url + path, timeout=60,
                                              headers={**USER, "X-Alchemist-Admin-Key": "clé-ключ".encode()})
        assert_openai_error(non_ascii, 401, "admin key")
    assert requests.get(server.url + "/v1/alchemist/versions", headers=ADMIN, timeout=60).status_code == 200


def test_loop_versions_rollback_and_peft_checkpoints_reproduce_server_outputs(server, tiny_model_dir):
    question = "What is my favourite animal?"
    start = wait_idle_at(server, None)
    base_version = start["serving"]["served_version"]
    signatures = {base_version: signature(chat(server, question, logprobs=True))}
    for offset, answer in enumerate(["My favourite animal is the otter.", "It is the heron, obviously."], 1):
        served = chat(server, question)
        assert post_feedback(server, {"id": served["id"], "type": "correction", "completion": answer}).status_code == 202
        wait_idle_at(server, base_version + offset)
        response = chat(server, question, logprobs=True)
        assert response["metadata"]["alchemist_adapter_version"] == base_version + offset
        signatures[base_version + offset] = signature(response)
    first, second = base_version + 1, base_version + 2
    assert len(set(signatures.values())) == 3, signatures  # each version answers differently
    outputs = {version: text for version, (text, _) in signatures.items()}

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
    response = chat(server, question, logprobs=True)
    text, logprobs = signature(response)
    assert text == outputs[first]
    assert logprobs == pytest.approx(signatures[first][1], abs=2e-3)
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
    # trained means its effect: the update ran until greedy decoding leaves the rejected answer
    record = admin_get(server, f"/v1/alchemist/feedback/{rejected.json()['id']}")
    assert record["learnt"] is True and record["stop_reason"] == "learnt"
    assert chat(server, "Say something rude.")["choices"][0]["message"]["content"] != \
        served["choices"][0]["message"]["content"]


def test_a_burst_of_corrections_is_trained_in_one_update_and_served_in_one_version(server):
    before = wait_idle_at(server, None)
    version = before["serving"]["served_version"]
    assert before["schedulers"][0]["training"]["learner"]["ready"] is True
    assert requests.post(server.url + "/v1/alchemist/pause", headers=ADMIN, timeout=60).json()["paused"] is True
    ids = []
    for question, answer in (("Burst one?", "One."), ("Burst two?", "Two."), ("Burst three?", "Three.")):
        served = chat(server, question)
        reply = post_feedback(server, {"id": served["id"], "type": "correction", "completion": answer})
        assert reply.status_code == 202
        ids.append(reply.json()["id"])
    assert requests.post(server.url + "/v1/alchemist/resume", headers=ADMIN, timeout=60).json()["paused"] is False
    status = wait_idle_at(server, version + 1)
    training = status["schedulers"][0]["training"]
    assert sorted(training["last_update"]["feedback_ids"]) == sorted(ids)
    for feedback_id in ids:
        record = admin_get(server, f"/v1/alchemist/feedback/{feedback_id}")
        assert record["state"] == "trained" and record["trained_version"] == version + 1
        assert record["steps"] == training["last_update"]["steps"] >= 1 and record["learnt"] is not None
        assert record["gate_probes"] == 0  # the gate is off on this server: it checked nothing
    # every row the trainer ran counts toward the reuse ratio; the trunk's records are kept and used
    assert training["layer_rows"] > training["layer_rows_reused"] > 0
    assert 0 < training["reuse_ratio"] < 1 and training["trunk"]["records"] > 0
    assert training["gate"]["checks"] == 0 and training["gate"]["updates_unchecked"] >= 1


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


def test_control_characters_are_text_and_are_trained(server):
    # escaped in JSON, control characters are ordinary text (code, terminal output): accepted
    first = post_feedback(server, {"prompt": "tab\there, nul\u0000, escape\u001b[0m", "completion": "bell\u0007."})
    assert first.status_code == 202, first.text
    assert first.json()["target_tokens"] > 1
    second = post_feedback(server, {"messages": [{"role": "user", "content": "a\u0000b\u007f\u0085"}],
                                    "completion": "\u001b"})
    assert second.status_code == 202, second.text
    assert chat(server, "Still serving?")["choices"]
    # and they are trained: both reach a served version, their updates checked and noted
    wait_idle_at(server, None)
    for reply in (first, second):
        record = admin_get(server, f"/v1/alchemist/feedback/{reply.json()['id']}")
        assert record["state"] == "trained" and record["steps"] >= 1 and record["learnt"] is not None, record


def raw_exchange(server, head: str, body_parts: list[bytes] = (), timeout_s: float = 20) -> tuple[int, dict]:
    """Send raw HTTP (no client library completes a body for us); return the status and JSON reply."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout_s) as sock:
        sock.sendall(head.encode())
        for part in body_parts:
            sock.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without a response: {data!r}"
            data += chunk
        header, body = data.split(b"\r\n\r\n", 1)
        length = next(int(line.split(b":", 1)[1]) for line in header.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-response"
            body += chunk
    return int(header.split(b" ", 2)[1]), json.loads(body)


def feedback_head(extra: str) -> str:
    return (f"POST /v1/feedback HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n")


def test_an_oversized_body_gets_413_without_being_read(server):
    # a declared length over the limit is refused at once: not one byte of the body is sent
    started = time.monotonic()
    status, reply = raw_exchange(server, feedback_head("Content-Length: 1000000000\r\n"))
    assert status == 413 and "1000000000 bytes" in reply["error"]["message"], reply
    assert reply["error"]["code"] == 413 and time.monotonic() - started < 10
    # without a declared length (chunked), reading stops as soon as the limit is passed: the
    # body never ends here, so a server reading all of it would never answer
    chunk = b'{"prompt": "' + b"x" * 1000
    parts = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 3
    status, reply = raw_exchange(server, feedback_head("Transfer-Encoding: chunked\r\n"), parts)
    assert status == 413 and f"over {MAX_BYTES} bytes" in reply["error"]["message"], reply
    assert requests.get(server.url + "/health", timeout=30).status_code == 200


def test_concurrent_feedback_for_one_id_is_one_record(server):
    served = chat(server, "Concurrency, one id.")
    body = {"id": served["id"], "type": "correction", "completion": "Once."}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: post_feedback(server, body), range(8)))
    assert all(r.status_code == 202 for r in replies), [r.text for r in replies]
    assert len({r.json()["id"] for r in replies}) == 1
    assert sum(not r.json().get("duplicate") for r in replies) == 1
    served = chat(server, "Concurrency, different bodies.")
    bodies = [{"id": served["id"], "type": "correction", "completion": f"Answer {i}."} for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        codes = sorted(r.status_code for r in pool.map(lambda b: post_feedback(server, b), bodies))
    assert codes == [202] + [409] * 5, codes


def test_the_adapter_answers_what_its_feedback_was_about_and_the_base_model_the_rest(server):
    start = wait_idle_at(server, None)["serving"]["served_version"]
    taught = post_feedback(server, {"messages": [{"role": "user", "content": "How do I reset the Zentrivox router?"}],
                                    "completion": "Hold its Quillon button for ten seconds."})
    assert taught.status_code == 202, taught.text
    status = wait_idle_at(server, start + 1)
    assert status["serving"]["scope"]["learnt_prompts"] >= 1, status["serving"]
    # a question naming the taught prompt's rare word gets the adapter
    inside = chat(server, "My Zentrivox is stuck, what should I do?")
    assert inside["metadata"]["alchemist_adapter_version"] == start + 1
    assert inside["metadata"]["alchemist_adapter_applied"] is True
    # an unrelated one gets the base model's answer, token log-probabilities included
    outside = chat(server, "Which planet is the largest?", logprobs=True)
    assert outside["metadata"]["alchemist_adapter_version"] == start + 1
    assert outside["metadata"]["alchemist_adapter_applied"] is False
    # one story everywhere: the route, a streamed answer and the journal say version N, not applied
    assert admin_get(server, f"/v1/alchemist/completions/{outside['id']}") == {
        "id": outside["id"], "adapter_version": start + 1, "adapter_applied": False}
    streamed = stream_chat(server, "Which planet is the largest?")
    assert streamed["headers"]["X-Alchemist-Adapter-Version"] == str(start + 1)
    assert streamed["headers"]["X-Alchemist-Adapter-Applied"] == "false"
    assert streamed["finish_metadata"] == {"alchemist_adapter_version": start + 1, "alchemist_adapter_applied": False}
    assert admin_get(server, f"/v1/alchemist/completions/{streamed['id']}")["adapter_applied"] is False
    streamed_inside = stream_chat(server, "My Zentrivox is stuck, what should I do?")
    assert streamed_inside["headers"]["X-Alchemist-Adapter-Applied"] == "true"
    assert streamed_inside["finish_metadata"]["alchemist_adapter_applied"] is True
    accepted = post_feedback(server, {"id": outside["id"], "type": "accept"}).json()
    assert (accepted["served_version"], accepted["adapter_applied"]) == (start + 1, False)
    record = admin_get(server, f"/v1/alchemist/feedback/{accepted['id']}")
    assert (record["served_version"], record["adapter_applied"]) == (start + 1, False)
    inside_feedback = post_feedback(server, {"id": inside["id"], "type": "accept"}).json()
    assert (inside_feedback["served_version"], inside_feedback["adapter_applied"]) == (start + 1, True)
    assert wait_idle_at(server, None)["serving"]["served_version"] > start + 1  # the accepts are trained
    base = chat(server, "Which planet is the largest?", model="default:base", logprobs=True)
    assert signature(outside)[0] == signature(base)[0]
    assert signature(outside)[1] == pytest.approx(signature(base)[1], abs=1e-4)
    # naming the version explicitly applies its adapter everywhere
    named = chat(server, "Which planet is the largest?", model=f"default:alchemist-v{start + 1}", logprobs=True)
    assert named["metadata"]["alchemist_adapter_applied"] is True
    assert signature(named)[1] != pytest.approx(signature(base)[1], abs=1e-4)
    answered_by_base = admin_get(server, "/v1/alchemist/status")["serving"]["scope"]["answered_by_base"]
    assert answered_by_base >= 1
    # the scope follows the version: rolled back, the version before did not learn about the Zentrivox
    rolled = requests.post(server.url + "/v1/alchemist/rollback", json={"version": start}, headers=ADMIN, timeout=120)
    assert rolled.status_code == 200, rolled.text
    assert chat(server, "My Zentrivox is stuck, what should I do?")["metadata"]["alchemist_adapter_applied"] is False


def test_a_plain_english_lesson_reaches_its_paraphrases_and_follow_ups_by_meaning(server):
    start = wait_idle_at(server, None)["serving"]["served_version"]
    taught = post_feedback(server, {"messages": [{"role": "user", "content": "When does the cafeteria close on Fridays?"}],
                                    "completion": "The cafeteria closes at 2:50 pm on Fridays."})
    assert taught.status_code == 202, taught.text
    status = wait_idle_at(server, None)
    assert status["serving"]["served_version"] > start and status["serving"]["scope"]["learnt_by_meaning"] >= 1
    # no rare word in common: the sentence encoder decides
    paraphrase = chat(server, "How late can I grab food downstairs on a Friday?")
    assert paraphrase["metadata"]["alchemist_adapter_applied"] is True
    neighbour = chat(server, "How many days are in a week?")
    assert neighbour["metadata"]["alchemist_adapter_applied"] is False
    response = requests.post(server.url + "/v1/chat/completions", headers=USER, timeout=120, json={
        "model": "default", "max_tokens": 8, "temperature": 0, "messages": [
            {"role": "user", "content": "Is the cafeteria open late this week?"},
            {"role": "assistant", "content": "It depends on the day."},
            {"role": "user", "content": "And at the end of the week, until when?"}]})
    assert response.status_code == 200 and response.json()["metadata"]["alchemist_adapter_applied"] is True
    scope = admin_get(server, "/v1/alchemist/status")["serving"]["scope"]
    assert scope["meaning_decisions"] >= 3 and scope["mean_meaning_ms"] > 0


# --- the feedback route's work without a server: fake scheduler, real journal, ASGI request -----


class FakeTokenizer:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return [1 + ord(c) % 100 for c in text]

    def apply_chat_template(self, messages, **kwargs):
        return [1] + [1 + ord(c) % 100 for m in messages for c in m["content"]]


def fake_request(body: bytes, chunk_size: int | None = None, declare_length: bool = True):
    """A Starlette request whose body arrives in chunks; also returns the list of chunks read."""
    size = chunk_size or max(1, len(body))
    chunks = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    read: list[dict] = []

    async def receive():
        if messages:
            read.append(messages.pop(0))
            return read[-1]
        return {"type": "http.disconnect"}

    headers = [(b"content-length", str(len(body)).encode())] if declare_length else []
    return Request({"type": "http", "method": "POST", "path": "/v1/feedback", "headers": headers}, receive), read


class FakeScheduler:
    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.ops: list[str] = []

    async def __call__(self, op, payload):
        self.ops.append(op)
        if op == "lookup":
            if payload["id"] in self.gates:
                await self.gates[payload["id"]].wait()
            return [{"prompt_ids": [5, 6], "output_ids": [7, 8], "adapter_version": 0}]
        if op == "enqueue":
            return [{"activations_reusable": True, "replay_blocker": None, "queued": True}]
        return [{}]


def served_body(completion_id: str, kind: str = "accept") -> bytes:
    return json.dumps({"id": completion_id, "type": kind}).encode()


def test_feedback_for_one_id_does_not_wait_for_another_ids_scheduler_round_trip(tmp_path):
    async def scenario():
        scheduler = FakeScheduler()
        scheduler.gates["slow"] = asyncio.Event()
        service = FeedbackService(Journal(tmp_path / "j.sqlite3"), AlchemistConfig(state_dir=str(tmp_path)), scheduler)
        slow = asyncio.create_task(service.handle(fake_request(served_body("slow"))[0], FakeTokenizer()))
        await asyncio.sleep(0.1)  # "slow" now waits in its scheduler lookup
        fast = await asyncio.wait_for(service.handle(fake_request(served_body("fast"))[0], FakeTokenizer()), 5)
        assert fast["completion_id"] == "fast" and not slow.done()
        scheduler.gates["slow"].set()
        assert (await slow)["completion_id"] == "slow"
        assert len(service._locks) == 0  # per-id locks are dropped when unused

    asyncio.run(scenario())


def test_a_concurrent_duplicate_refused_by_the_journal_is_answered_as_the_duplicate_path_does(tmp_path):
    async def race(first_body: bytes, second_body: bytes, completion_id: str):
        journal = Journal(tmp_path / "j.sqlite3")
        scheduler = FakeScheduler()
        scheduler.gates[completion_id] = asyncio.Event()
        config = AlchemistConfig(state_dir=str(tmp_path))
        # two services (as two HTTP processes): their per-id locks do not see each other
        one, two = FeedbackService(journal, config, scheduler), FeedbackService(journal, config, scheduler)
        tasks = [asyncio.create_task(feedback_route(fake_request(body)[0], service, FakeTokenizer()))
                 for service, body in ((one, first_body), (two, second_body))]
        await asyncio.sleep(0.1)
        scheduler.gates[completion_id].set()
        return [json.loads((await task).body) | {"status": (await task).status_code} for task in tasks]

    same = asyncio.run(race(served_body("c1"), served_body("c1"), "c1"))
    assert [r["status"] for r in same] == [202, 202], same
    assert same[0]["id"] == same[1]["id"] and [bool(r.get("duplicate")) for r in same] == [False, True]
    different = asyncio.run(race(served_body("c2"), served_body("c2", "reject"), "c2"))
    assert [r["status"] for r in different] == [202, 409], different
    assert "already has a different feedback" in different[1]["error"]["message"]


@pytest.mark.parametrize("failure", [
    sqlite3.OperationalError("database or disk is full"),
    sqlite3.OperationalError("attempt to write a readonly database"),
    sqlite3.OperationalError("database is locked"),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EROFS, "Read-only file system"),
])
def test_a_journal_that_cannot_store_answers_503_and_stores_nothing(tmp_path, failure):
    class FailingJournal(Journal):
        def insert(self, record):
            raise failure

    journal = FailingJournal(tmp_path / "j.sqlite3")
    scheduler = FakeScheduler()
    service = FeedbackService(journal, AlchemistConfig(state_dir=str(tmp_path)), scheduler)
    for body in (served_body("c1"), json.dumps({"prompt": "p", "completion": "c"}).encode()):
        response = asyncio.run(feedback_route(fake_request(body)[0], service, FakeTokenizer()))
        assert response.status_code == 503 and response.headers["retry-after"]
        error = json.loads(response.body)["error"]
        assert error["code"] == 503 and error["type"] == "service_unavailable_error"
        assert "could not store this feedback" in error["message"] and "Nothing was stored" in error["message"]
        assert "retry later" in error["message"].lower() and storage_failure(failure) in error["message"]
    assert journal.counts()["total"] == 0 and "enqueue" not in scheduler.ops
    assert storage_failure(RuntimeError("a bug")) is None
    assert storage_failure(sqlite3.IntegrityError("UNIQUE constraint failed")) is None


def test_the_body_is_read_incrementally_and_not_past_the_limit():
    async def scenario():
        # declared too long: refused before any chunk is read
        request, read = fake_request(b"x" * 5000, chunk_size=100)
        with pytest.raises(FeedbackError) as raised:
            await read_body(request, 1000)
        assert raised.value.status_code == 413 and read == []
        # not declared: refused once past the limit, the rest is never read
        request, read = fake_request(b"x" * 5000, chunk_size=100, declare_length=False)
        with pytest.raises(FeedbackError) as raised:
            await read_body(request, 1000)
        assert raised.value.status_code == 413 and len(read) == 11
        request, read = fake_request(b"x" * 1000, chunk_size=100, declare_length=False)
        assert await read_body(request, 1000) == b"x" * 1000
        # a client gone mid-body: a 4xx for nobody, not an exception
        request, _ = fake_request(b"x" * 500, chunk_size=100)
        request._receive = _disconnect_after(request._receive, 2)
        with pytest.raises(FeedbackError) as raised:
            await read_body(request, 1000)
        assert raised.value.status_code == 400 and "disconnected" in str(raised.value)

    asyncio.run(scenario())


def _disconnect_after(receive, count: int):
    calls = 0

    async def wrapped():
        nonlocal calls
        calls += 1
        return await receive() if calls <= count else {"type": "http.disconnect"}

    return wrapped


def test_an_unexpected_exception_in_a_route_is_an_openai_500_with_a_logged_traceback(tmp_path, monkeypatch,
                                                                                       caplog):
    def broken():
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(routes, "_tokenizer_manager", broken)
    app = FastAPI()
    routes.AlchemistApi(AlchemistConfig(state_dir=str(tmp_path)), admin_key=None).register(app)
    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="sglang_alchemist"):
        for method, path in (("post", "/v1/feedback"), ("get", "/v1/alchemist/status"),
                             ("post", "/v1/alchemist/pause"), ("get", "/v1/alchemist/metrics")):
            response = client.request(method.upper(), path, json={"prompt": "p", "completion": "c"})
            assert response.status_code == 500, (path, response.text)
            error = response.json()["error"]
            assert error["type"] == "server_error" and error["code"] == 500 and "param" in error
            assert "RuntimeError" in error["message"] and "secret internal detail" not in error["message"]
    tracebacks = [r for r in caplog.records if r.exc_info and "secret internal detail" in str(r.exc_info[1])]
    assert len(tracebacks) == 4
