"""A hostile or careless client, and the operations side, through the real server.

One tiny-model server for the module, with SGLang's ``--enable-metrics`` and the admin key in a
key file (and a *different* key in ``SGLANG_ALCHEMIST_ADMIN_KEY``, which the file must win over).
Covers: the key never leaving the HTTP process; streaming responses that carry the adapter
version; the training metrics on SGLang's own ``/metrics``; the start-up line; clients that
disconnect mid-request; 200 concurrent feedback posts (latency printed); and the journal locked
by another process (503, serving goes on, then 202 again).
"""

from __future__ import annotations

import json
import socket
import sqlite3
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import psutil
import pytest
import requests

from helpers import tiny_server_args

FILE_KEY, ENV_KEY = "key-from-the-file", "key-from-the-environment"
ADMIN = {"X-Alchemist-Admin-Key": FILE_KEY}


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def server(launch_server, tiny_model_dir, tmp_path_factory, state_dir):
    key_file = tmp_path_factory.mktemp("secrets") / "admin.key"
    key_file.write_text(f"  {FILE_KEY}\n")
    args = tiny_server_args(
        tiny_model_dir, state_dir, "--enable-metrics", "--alchemist-admin-key-file", str(key_file),
        "--alchemist-lr", "0.02",
    )
    server = launch_server(args, name="hostile-client", env={"SGLANG_ALCHEMIST_ADMIN_KEY": ENV_KEY})
    yield server
    server.stop()


def chat(server, content: str, max_tokens: int = 4, **extra) -> dict:
    response = requests.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": "default", "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0, **extra,
    })
    assert response.status_code == 200, response.text
    return response.json()


def admin_status(server) -> dict:
    response = requests.get(server.url + "/v1/alchemist/status", headers=ADMIN, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def wait_served(server, version: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if admin_status(server)["serving"]["served_version"] >= version:
            return
        time.sleep(0.3)
    raise AssertionError(f"version {version} not served in time")


def assert_healthy(server) -> None:
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    assert chat(server, "Are you still there?")["choices"][0]["message"]["content"] is not None


def test_startup_line_says_what_is_recorded_where_state_lives_and_what_is_served(server, state_dir):
    deadline = time.monotonic() + 60
    while "sglang_alchemist: ready:" not in server.log_tail(10**7) and time.monotonic() < deadline:
        time.sleep(0.5)
    [line] = [line for line in server.log_tail(10**7).splitlines() if "sglang_alchemist: ready:" in line]
    assert "recording every request's prefill (--alchemist-record all)" in line
    assert f"state in {state_dir.resolve()}" in line and "serving adapter version 0 (the base model)" in line
    assert "admin endpoints need the admin key" in line
    assert "open to the network" not in server.log_tail(10**7)  # loopback host, and a key is set


def test_admin_key_comes_from_the_file_and_never_leaves_the_http_process(server):
    assert requests.get(server.url + "/v1/alchemist/versions", headers=ADMIN, timeout=60).status_code == 200
    assert requests.get(server.url + "/v1/alchemist/versions", timeout=60,
                        headers={"Authorization": f"Bearer {FILE_KEY}"}).status_code == 200
    for offered in (ENV_KEY, "", "clé ключ".encode(), FILE_KEY[:-1], FILE_KEY + "x"):
        denied = requests.get(server.url + "/v1/alchemist/versions", timeout=60,
                              headers={"X-Alchemist-Admin-Key": offered})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == 401, (offered, denied.text)
    status = requests.get(server.url + "/v1/alchemist/status", headers=ADMIN, timeout=60)
    assert FILE_KEY not in status.text and ENV_KEY not in status.text
    assert status.json()["http_process"]["config"]["admin_key"] == "<set>"
    assert "admin_key" not in status.json()["schedulers"][0]["config"]
    # the scheduler and detokenizer inherit neither the key nor the variable
    children = psutil.Process(server.process.pid).children(recursive=True)
    sglang_children = [child for child in children if "SGLANG_ALCHEMIST_CONFIG" in child.environ()]
    assert sglang_children  # the scheduler (and detokenizer) read the exported config
    for child in sglang_children:
        assert json.loads(child.environ()["SGLANG_ALCHEMIST_CONFIG"])["admin_key"] is None
    for child in children:
        environ = child.environ()
        assert "SGLANG_ALCHEMIST_ADMIN_KEY" not in environ
        assert not any(FILE_KEY in value or ENV_KEY in value for value in environ.values())
        assert not any(FILE_KEY in arg for arg in child.cmdline())


def stream_events(response: requests.Response) -> list[dict]:
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[len("data: "):]))
    return events


def test_streaming_responses_carry_the_adapter_version(server):
    taught = requests.post(server.url + "/v1/feedback", timeout=120, json={
        "messages": [{"role": "user", "content": "Name the river."}], "completion": "The Orsanne."})
    assert taught.status_code == 202, taught.text
    wait_served(server, 1)
    version = admin_status(server)["serving"]["served_version"]
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name the river."}]}),
                       ("/v1/completions", {"prompt": "The river is"})):
        response = requests.post(server.url + path, stream=True, timeout=120, json={
            "model": "default", "max_tokens": 6, "temperature": 0, "stream": True, **body})
        assert response.status_code == 200, response.text
        assert response.headers["X-Alchemist-Adapter-Version"] == str(version)
        events = stream_events(response)
        finishing = [e for e in events if any(c.get("finish_reason") for c in e.get("choices", []))]
        assert finishing, events
        assert all(e["metadata"]["alchemist_adapter_version"] == version for e in finishing), finishing
        unfinished = [e for e in events if e not in finishing]
        assert unfinished and all("alchemist_adapter_version" not in (e.get("metadata") or {}) for e in unfinished)
    # the base model, named explicitly, is version 0 in a stream too; official clients parse the chunks
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    chunks = list(client.chat.completions.create(model="default:base", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, temperature=0, stream=True))
    last = next(c for c in reversed(chunks) if c.choices and c.choices[0].finish_reason)
    assert last.model_extra["metadata"]["alchemist_adapter_version"] == 0


def test_training_metrics_are_on_sglangs_own_metrics(server):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = requests.get(server.url + "/metrics", timeout=30).text
        steps = [line for line in text.splitlines() if line.startswith("sglang_alchemist_optimizer_steps_total{")]
        if steps and float(steps[0].split()[-1]) >= 1:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"no trained steps on /metrics: {text[-3000:]}")
    for name in ("sglang_alchemist_recent_loss", "sglang_alchemist_queue_depth", "sglang_alchemist_reuse_ratio",
                 "sglang_alchemist_served_adapter_version", "sglang_alchemist_slo_attainment",
                 "sglang_alchemist_ttft_attainment", "sglang_alchemist_store_host_bytes",
                 "sglang_alchemist_journal_trained_total", "sglang_alchemist_metrics_age_seconds"):
        assert name in text, name
    assert "sglang:" in text  # SGLang's own metrics are still there: one scrape target


def test_clients_that_disconnect_mid_request_leave_the_server_healthy(server):
    # a streaming chat dropped after its first chunk
    response = requests.post(server.url + "/v1/chat/completions", stream=True, timeout=120, json={
        "model": "default", "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True})
    assert response.status_code == 200
    assert next(response.iter_lines())
    response.close()
    # a feedback whose body arrives slowly and never completes: the server serves others meanwhile
    head = ("POST /v1/feedback HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 500\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode() + b'{"prompt": "slow')
        time.sleep(0.5)
        sock.sendall(b" and slower")
        assert_healthy(server)
    # a feedback sent whole, then the connection dropped before the reply: it is still stored once
    served = chat(server, "Drop me.")
    body = json.dumps({"id": served["id"], "type": "accept"}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/feedback HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while True:
        again = requests.post(server.url + "/v1/feedback", data=body, timeout=60,
                              headers={"Content-Type": "application/json"})
        if again.status_code == 202 and again.json().get("duplicate") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert again.status_code == 202 and again.json()["duplicate"] is True, again.text
    assert_healthy(server)
    assert "Traceback" not in server.log_tail(10**7)


def test_200_concurrent_feedback_posts_are_all_accepted(server):
    assert requests.post(server.url + "/v1/alchemist/pause", headers=ADMIN, timeout=60).status_code == 200
    before = admin_status(server)["schedulers"][0]["journal"]["total"]
    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(lambda i: chat(server, f"Question number {i}?", max_tokens=2)["id"], range(200)))

    def post(completion_id: str) -> tuple[int, float]:
        started = time.perf_counter()
        response = requests.post(server.url + "/v1/feedback", timeout=120,
                                 json={"id": completion_id, "type": "correction", "completion": "Answer."})
        return response.status_code, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(post, served))
    wall = time.perf_counter() - started
    assert [code for code, _ in results] == [202] * 200
    latencies = sorted(seconds * 1000 for _, seconds in results)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * len(latencies)) - 1]
    print(f"\n200 concurrent feedback posts (20 threads): p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"max {latencies[-1]:.1f} ms, {200 / wall:.0f} posts/s")
    assert admin_status(server)["schedulers"][0]["journal"]["total"] == before + 200


def test_a_journal_locked_by_another_process_answers_503_and_serving_goes_on(server, state_dir):
    # training paused: the scheduler would otherwise wait on the lock to mark records trained
    assert requests.post(server.url + "/v1/alchemist/pause", headers=ADMIN, timeout=60).status_code == 200
    served = chat(server, "Lock test.")
    body = {"id": served["id"], "type": "correction", "completion": "Unlocked."}
    locker = sqlite3.connect(str(state_dir / "feedback.sqlite3"), isolation_level=None, timeout=5)
    locker.execute("BEGIN IMMEDIATE")  # holds the write lock past the server's busy timeout
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(requests.post, server.url + "/v1/feedback", json=body, timeout=120)
            time.sleep(1)
            assert chat(server, "Serving while the journal is locked.")["choices"]
            refused = pending.result()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == 503 and "locked" in error["message"] and "Nothing was stored" in error["message"]
    assert refused.headers["Retry-After"]
    accepted = requests.post(server.url + "/v1/feedback", json=body, timeout=120)
    assert accepted.status_code == 202 and not accepted.json().get("duplicate"), accepted.text
    assert_healthy(server)
