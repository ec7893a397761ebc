"""Crash and restart: kill -9 while feedback is training, restart on the same state directory.

Nothing acknowledged may be lost: every feedback that got a 202 is in the journal, records not
in a checkpoint train again after the restart, the latest checkpointed version is restored and
served, and journal counts add up.
"""

from __future__ import annotations

import time

import requests

from helpers import chat, status, tiny_server_args


def post_feedback(server, completion_id: str, answer: str) -> dict:
    response = requests.post(server.url + "/v1/feedback", timeout=120,
                             json={"id": completion_id, "type": "correction", "completion": answer})
    assert response.status_code == 202, response.text
    return response.json()


def wait_all_trained(server, expected_records: int, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = status(server)
        journal = current["schedulers"][0]["journal"]
        if journal["trained"] == expected_records and current["serving"]["served_version"] == \
                current["schedulers"][0]["versions"]["current"]:
            return current
        time.sleep(0.5)
    raise AssertionError(f"not all trained: {current['schedulers'][0]['journal']}")


def test_kill_during_training_then_restart_loses_nothing(launch_server, tiny_model_dir, tmp_path):
    state_dir = tmp_path / "state"
    args = tiny_server_args(tiny_model_dir, state_dir, "--alchemist-lr", "0.02",
                            "--alchemist-keep-checkpoints", "100")  # the pinned version stays loadable

    first = launch_server(args, name="before-crash")
    served = chat(first, "Which planet is the largest?")
    post_feedback(first, served["id"], "Jupiter is the largest planet.")
    settled = wait_all_trained(first, expected_records=1)
    version_before = settled["serving"]["served_version"]
    answer_before = chat(first, "Which planet is the largest?")["choices"][0]["message"]["content"]

    # a backlog: queued while training is paused, then training resumes and the server is killed
    requests.post(first.url + "/v1/alchemist/pause", timeout=60).raise_for_status()
    for index in range(12):
        response = chat(first, f"Question number {index}?")
        post_feedback(first, response["id"], f"Answer number {index}.")
    requests.post(first.url + "/v1/alchemist/resume", timeout=60).raise_for_status()
    time.sleep(0.2)
    in_flight = status(first)["schedulers"][0]
    first.kill_hard()  # SIGKILL to every process of the server: no shutdown code runs
    assert in_flight["journal"]["total"] == 13 and in_flight["journal"]["queued"] > 0

    second = launch_server(args, name="after-crash")
    restored = status(second)
    versions = requests.get(second.url + "/v1/alchemist/versions", timeout=60).json()
    assert version_before in versions["lineage"]
    assert restored["serving"]["served_version"] >= version_before
    assert restored["serving"]["scope"]["learnt_prompts"] >= 1  # rebuilt from the journal
    assert restored["schedulers"][0]["journal"]["total"] == 13  # every acknowledged feedback survived
    # the restored checkpoint still answers as before the crash
    pinned = chat(second, "Which planet is the largest?", model=f"default:alchemist-v{version_before}")
    assert pinned["choices"][0]["message"]["content"] == answer_before
    # the taught question is in the restored version's scope: its adapter answers it by default
    assert chat(second, "Which planet is the largest?")["metadata"]["alchemist_adapter_applied"] is True

    final = wait_all_trained(second, expected_records=13)
    journal = final["schedulers"][0]["journal"]
    assert journal == {"queued": 0, "trained": 13, "rejected": 0, "dropped": 0, "total": 13}
    assert final["serving"]["served_version"] > version_before
    training = final["schedulers"][0]["training"]
    # what was not checkpointed before the crash trained again, by recomputation (the recorded
    # activations died with the process)
    # (samples count every item of a step: the feedback, replayed earlier feedback, rehearsal)
    assert training["samples_trained"] == training["samples_recomputed"] >= 1 and training["samples_replayed"] == 0
