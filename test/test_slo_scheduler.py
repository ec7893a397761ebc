"""The unified scheduler under load: training interleaves with decode batches within the TPOT target.

A tiny-model server gets a backlog of feedback and a bounded loopback load of concurrent
streaming chats. The SLO controller's own accounting must show >= 95% of decode steps within
the target while training progresses between decode batches; with a target too tight for any
training slice, training waits while the load lasts and resumes once the engine is idle. Every
request completes.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import openai
import pytest
import requests

from sglang_alchemist.scheduler.controller import SloController

from helpers import status, tiny_server_args

TPOT_TARGET_MS = 150


@pytest.fixture(scope="module")
def server(launch_server, tiny_model_dir, tmp_path_factory):
    args = tiny_server_args(
        tiny_model_dir, tmp_path_factory.mktemp("state"),
        "--alchemist-tpot-slo-ms", str(TPOT_TARGET_MS), "--alchemist-batch-samples", "1",
        "--alchemist-lr", "0.0005",
    )
    server = launch_server(args, name="slo")
    yield server
    server.stop()


def submit_backlog(server, count: int) -> None:
    """External exchanges with long completions: each is a sizeable training sample."""
    for index in range(count):
        body = {"messages": [{"role": "user", "content": f"Explain topic {index} in detail. " * 8}],
                "completion": "Here is a detailed explanation of the topic, step by step. " * 25}
        response = requests.post(server.url + "/v1/feedback", json=body, timeout=60)
        assert response.status_code == 202, response.text


def streaming_load(server, threads: int, requests_per_thread: int, max_tokens: int) -> list[dict]:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300)

    def worker(thread: int) -> list[dict]:
        results = []
        for index in range(requests_per_thread):
            stream = client.chat.completions.create(
                model="default", stream=True, max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": f"Thread {thread}, request {index}: write a poem."}],
                extra_body={"ignore_eos": True}, stream_options={"include_usage": True},
            )
            tokens, finish = 0, None  # chunks may carry several tokens: count from the usage
            for chunk in stream:
                if chunk.choices:
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            results.append({"tokens": tokens, "finish_reason": finish})
        return results

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return [r for rs in pool.map(worker, range(threads)) for r in rs]


def post_admin(server, path: str, body: dict | None = None) -> dict:
    response = requests.post(server.url + path, json=body or {}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def wait_idle(server, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = status(server)
        training = current["schedulers"][0]["training"]
        if training["queue_depth"] == 0 and not training["step_in_progress"]:
            return current
        time.sleep(0.5)
    raise AssertionError(f"training did not finish: {current['schedulers'][0]['training']}")


def test_training_progresses_under_load_with_decode_steps_within_the_target(server):
    post_admin(server, "/v1/alchemist/pause")
    submit_backlog(server, 40)
    before = status(server)["schedulers"][0]
    post_admin(server, "/v1/alchemist/resume")
    results = streaming_load(server, threads=6, requests_per_thread=3, max_tokens=96)
    after = status(server)["schedulers"][0]
    assert all(r["finish_reason"] == "length" and r["tokens"] == 96 for r in results), results
    controller = after["scheduler"]
    assert controller["decode_steps"] > 200
    assert controller["slo_attainment"] >= 0.95, controller
    # every streamed request's time to first token was counted, training delay included
    assert controller["first_tokens"] - before["scheduler"]["first_tokens"] == len(results)
    assert controller["ttft_attainment"] >= 0.95 and controller["worst_ttft_ms"] > 0, controller
    slices_while_decoding = controller["slices_by_grant"].get("decode_slack", 0) - \
        before["scheduler"]["slices_by_grant"].get("decode_slack", 0)
    assert slices_while_decoding > 0, json.dumps(after)  # training ran between decode batches
    assert after["training"]["optimizer_steps"] > before["training"]["optimizer_steps"], (before, after)
    assert after["internal_errors"] == 0
    wait_idle(server)


def test_training_waits_under_load_when_the_target_is_too_tight_and_resumes_when_idle(server):
    wait_idle(server)
    post_admin(server, "/v1/alchemist/pause")
    submit_backlog(server, 12)
    post_admin(server, "/v1/alchemist/slo", {"tpot_slo_ms": 0.01})  # below any decode step
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(streaming_load, server, 6, 2, 128)
        time.sleep(2.0)  # the load is running
        post_admin(server, "/v1/alchemist/resume")
        during = status(server)["schedulers"][0]
        results = load.result()
    ended = status(server)["schedulers"][0]
    assert all(r["finish_reason"] == "length" for r in results)
    assert ended["training"]["optimizer_steps"] == during["training"]["optimizer_steps"]  # waited
    assert ended["training"]["slices_run"] == during["training"]["slices_run"]  # not one slice
    assert ended["scheduler"]["slices_by_grant"].get("decode_slack", 0) == \
        during["scheduler"]["slices_by_grant"].get("decode_slack", 0)
    finished = wait_idle(server)["schedulers"][0]  # idle now: training resumes and drains
    assert finished["training"]["optimizer_steps"] >= ended["training"]["optimizer_steps"] + 3
    assert finished["scheduler"]["slices_by_grant"]["idle"] > ended["scheduler"]["slices_by_grant"].get("idle", 0)
    post_admin(server, "/v1/alchemist/slo", {"tpot_slo_ms": TPOT_TARGET_MS})


def test_bad_slo_values_are_refused(server):
    response = requests.post(server.url + "/v1/alchemist/slo", json={"train_share": 1.5}, timeout=60)
    assert response.status_code == 400 and "train_share" in response.json()["error"]["message"]
    response = requests.post(server.url + "/v1/alchemist/slo", json={"tpot_ms": 5}, timeout=60)
    assert response.status_code == 400 and "unknown field" in response.json()["error"]["message"]


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_share_credit_lets_a_slice_longer_than_a_decode_step_run_and_bounds_the_training_share(share):
    controller = SloController(tpot_slo_s=0.150, ttft_slo_s=2.0, train_share=share, seconds_per_token_layer=1e-4)
    decode_s, slice_s, clock = 0.021, 0.047, 0.0  # one slice takes two decode steps and more
    training = serving = 0.0
    for _ in range(200):
        controller.on_batch(is_decode=True, started=clock, seconds=decode_s)
        clock += decode_s
        serving += decode_s
        grant = controller.grant(has_work=True, paused=False, running=1, waiting=0)
        assert grant.reason == "decode_slack" and grant.budget_s <= 0.150 * 0.9 - decode_s + 1e-9
        if grant.budget_s >= slice_s:
            controller.observe_slice(tokens=470, seconds=slice_s)
            clock += slice_s
            training += slice_s
    assert training > 0
    assert training <= share / (1 - share) * serving + 0.150  # the share, plus at most one target of credit
    assert training >= share / (1 - share) * serving - 0.150 - slice_s  # and the credit is used


def test_an_idle_training_pass_is_bounded_by_half_the_ttft_target():
    controller = SloController(tpot_slo_s=0.150, ttft_slo_s=0.2, train_share=0.5, seconds_per_token_layer=1e-4)
    controller._last_batch_end = float("-inf")  # long idle
    grant = controller.grant(has_work=True, paused=False, running=0, waiting=0)
    assert grant.reason == "idle" and grant.budget_s == pytest.approx(0.1)
    controller.set_targets(ttft_slo_s=5.0)
    assert controller.grant(has_work=True, paused=False, running=0, waiting=0).budget_s == pytest.approx(0.25)
    assert controller.grant(has_work=True, paused=False, running=0, waiting=2).reason == "waiting_prefill"
    controller.on_first_token(0.1)
    controller.on_first_token(6.0)
    assert controller.status()["ttft_attainment"] == 0.5 and controller.status()["worst_ttft_ms"] == 6000


def test_interleaved_prefill_that_fills_the_tpot_target_leaves_training_nothing():
    controller = SloController(tpot_slo_s=0.150, ttft_slo_s=2.0, train_share=1.0, seconds_per_token_layer=1e-4)
    clock = 0.0
    for _ in range(30):  # a loaded engine: a 100 ms prefill between every two 40 ms decode steps
        controller.on_batch(is_decode=False, started=clock, seconds=0.100)
        controller.on_batch(is_decode=True, started=clock + 0.100, seconds=0.040)
        clock += 0.140
    assert controller.grant(has_work=True, paused=False, running=4, waiting=0).budget_s == 0.0
    for _ in range(30):  # the arrivals stop: decode steps alone leave slack again
        controller.on_batch(is_decode=True, started=clock, seconds=0.040)
        clock += 0.040
    assert controller.grant(has_work=True, paused=False, running=4, waiting=0).budget_s > 0.08
