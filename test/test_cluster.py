"""Replicas (issue 14, part 2): N servers behind one front door, one adapter lineage.

- trainer level, no servers: two trainers in two processes, each stepping on one sample with
  gradients averaged over a gloo group, end at the weights of one trainer stepping on both;
- one cluster of 2 tiny-model replicas (``python -m sglang_alchemist.launch_cluster``) for the
  module: chats reach both replicas, feedback on either replica's completion is accepted and
  trained, both replicas publish the same version numbers with identical adapter weights, and a
  ``kill -9`` of one replica loses no acknowledged feedback and it rejoins.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import requests
import torch
import torch.multiprocessing as mp

from sglang_alchemist.assets.tiny_model import build_tiny_model
from sglang_alchemist.tools.server_process import ClusterProcess, free_port

from helpers import tiny_server_args

TOLERANCE = 1e-4
SAMPLES = [([1, 5, 9, 13, 17, 21], [30, 31, 32, 33]), ([2, 6, 10, 14], [40, 41, 42, 43, 44, 45, 46])]
STEPS = 3


# --- (d) parity at the trainer level ------------------------------------------------------------------


def _trainer(model_dir: Path, tmp: Path):
    from transformers import AutoModelForCausalLM

    from sglang_alchemist.training.lora import LORA_MODULES
    from sglang_alchemist.training.model_spec import frozen_model_from_transformers
    from sglang_alchemist.training.trainer import Trainer, TrainerSettings
    from sglang_alchemist.training.versions import VersionHistory

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    model = frozen_model_from_transformers(base)
    settings = TrainerSettings(rank=4, alpha=8.0, target_modules=tuple(LORA_MODULES), lr=0.01, weight_decay=0.01,
                               grad_clip=1.0, max_staleness=8, hedge="recompute")
    return Trainer(model, settings, VersionHistory(tmp / "adapters", 3), max_positions=256, seed=3)


def _steps(trainer, samples, scales, weight=1.0):
    from sglang_alchemist.training.step import run_to_completion
    from sglang_alchemist.training.trainer import TrainingItem

    for _ in range(STEPS):
        items = [TrainingItem(None, prompt, target, "sft") for prompt, target in samples]
        run_to_completion(trainer.step(items, scales, sync_weight=weight))
    return trainer.adapter.peft_state_dict()


def _replica(rank: int, model_dir: str, addr: str, out: str) -> None:
    from sglang_alchemist.cluster.sync import GradientSync

    torch.set_num_threads(1)
    trainer = _trainer(Path(model_dir), Path(out).parent / f"rank{rank}")
    trainer.sync = GradientSync(rank, 2, addr, timeout_s=60)
    trainer.sync.form()
    prompt, target = SAMPLES[rank]
    # this replica's mean loss per token, weighted by its token count: the average over the
    # replicas is then the mean over all tokens of the batch, as one trainer computes it
    state = _steps(trainer, [(prompt, target)], [1.0 / len(target)], weight=float(len(target)))
    torch.save({"parity": state, "lockstep": _lockstep_rounds(rank, Path(model_dir), Path(out).parent, trainer.sync)},
               out)


class _Publisher:
    full, pending = False, 0

    def __init__(self) -> None:
        self.jobs = []

    def submit(self, job) -> None:
        self.jobs.append(job)

    def wait_idle(self, timeout_s: float) -> bool:
        return True


class _Journal:
    def __init__(self) -> None:
        self.marks = []

    def mark_rejected(self, ids, reason) -> None:
        self.marks.append(("rejected", ids, reason))

    def mark_dropped(self, ids, reason) -> None:
        self.marks.append(("dropped", ids, reason))

    def note_updates(self, rows) -> None:
        self.marks.append(("noted", [row[0] for row in rows], None))


def _lockstep_rounds(rank: int, model_dir: Path, tmp: Path, sync) -> dict:
    """The training lane's cluster mode without a server: uneven work, identical steps and versions."""
    from transformers import AutoModelForCausalLM

    from sglang_alchemist.cluster.lockstep import ClusterLane
    from sglang_alchemist.config import AlchemistConfig
    from sglang_alchemist.scheduler.training_lane import TrainingLane
    from sglang_alchemist.training.lane_core import LearningCore
    from sglang_alchemist.training.model_spec import frozen_model_from_transformers
    from sglang_alchemist.training.trainer import TrainingItem

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    config = AlchemistConfig(state_dir=str(tmp / f"core{rank}"), lora_rank=4, lora_alpha=8.0, lr=0.01, passes=3,
                             replay_feedback=1, rehearsal=0, gate_max_regressions=-1)
    # every update runs its 3 steps (no stop at learnt): the rounds' step counts below are the lockstep's
    core = LearningCore(frozen_model_from_transformers(base), config, None, set(), Path(config.state_dir), 256,
                        recipe_overrides={"learnt_margin": float("inf")})
    publisher, journal = _Publisher(), _Journal()
    lane = TrainingLane(core, journal, publisher, publish_every=1, release_sample=lambda sample: None)
    lane.cluster = ClusterLane(lane, sync)
    core.trainer.sync = sync
    # rank 0: two corrections (3 passes each); rank 1: one accept (1 pass): uneven rounds and steps
    work = {0: [("fb-a", *SAMPLES[0], "correction"), ("fb-b", *SAMPLES[1], "correction")],
            1: [("fb-c", *SAMPLES[1], "accept")]}[rank]
    for feedback_id, prompt, target, kind in work:
        lane.enqueue(TrainingItem(feedback_id, list(prompt), list(target), "sft", kind=kind))
    deadline = time.monotonic() + 120
    while lane.cluster.counters.rounds_accepted < 2 or lane.cluster.in_round or lane.cluster.pending_rounds:
        assert time.monotonic() < deadline, "lockstep rounds did not finish"
        if lane._next_slice(None) is None:
            time.sleep(0.05)
    return {"adapter": core.trainer.adapter.peft_state_dict(), "steps": core.trainer.counters.optimizer_steps,
            "versions": len(publisher.jobs), "published_ids": [job.feedback_ids for job in publisher.jobs],
            "memory": sorted(item.feedback_id for item in core.memory.items), "marks": journal.marks}


def test_gradient_averaging_matches_one_trainer_on_the_batch_and_lockstep_rounds_agree(tmp_path):
    from sglang_alchemist.cluster.sync import host_store

    model_dir = build_tiny_model(tmp_path / "tiny")
    addr = f"127.0.0.1:{free_port()}"
    store = host_store(addr, timeout_s=60)
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    context = mp.get_context("spawn")
    processes = [context.Process(target=_replica, args=(r, str(model_dir), addr, outs[r])) for r in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(180)
        assert process.exitcode == 0
    del store
    results = [torch.load(out) for out in outs]
    replicas = [result["parity"] for result in results]
    total = sum(len(target) for _, target in SAMPLES)
    single = _steps(_trainer(model_dir, tmp_path / "single"), SAMPLES, [1.0 / total] * len(SAMPLES))
    for name, reference in single.items():
        assert torch.equal(replicas[0][name], replicas[1][name]), f"{name}: the replicas differ"
        error = (replicas[0][name] - reference).norm() / reference.norm().clamp_min(1e-12)
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"
    # the lane's lockstep rounds: the same optimizer steps, versions and weights on both replicas
    lockstep = [result["lockstep"] for result in results]
    assert lockstep[0]["steps"] == lockstep[1]["steps"] == 6  # round 1: max(3, 1) steps, round 2: 3 steps
    assert lockstep[0]["versions"] == lockstep[1]["versions"] == 2
    assert lockstep[0]["published_ids"] == [["fb-a"], ["fb-b"]] and lockstep[1]["published_ids"] == [["fb-c"], []]
    # fb-b corrects the prompt fb-c accepted (round 1): the later one replaces it in replay
    assert lockstep[0]["memory"] == lockstep[1]["memory"] == ["fb-a", "fb-b"]
    # nothing rejected or dropped; each replica noted its own updates in its journal
    assert [mark[:2] for mark in lockstep[0]["marks"]] == [("noted", ["fb-a"]), ("noted", ["fb-b"])]
    assert [mark[:2] for mark in lockstep[1]["marks"]] == [("noted", ["fb-c"])]
    for name, weight in lockstep[0]["adapter"].items():
        assert torch.equal(weight, lockstep[1]["adapter"][name]), f"{name}: the replicas' adapters differ"


# --- a cluster of 2 replicas behind the front door ------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster-state")
    args = ["--replicas", "2", *tiny_server_args(
        tiny_model_dir, state, "--alchemist-lr", "0.02", "--alchemist-lora-rank", "4", "--alchemist-lora-alpha", "8",
        "--alchemist-passes", "2", "--alchemist-rehearsal", "0", "--alchemist-replay-feedback", "1",
    )]
    server = ClusterProcess(args=args, log_path=tmp_path_factory.mktemp("logs") / "cluster.log")
    server.start()
    server.state_dir = state
    yield server
    server.stop()


def _replicas(cluster) -> list[dict]:
    response = requests.get(cluster.url + "/v1/alchemist/cluster", timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["replicas"]


def _served_by(replicas: list[dict], completion_id: str) -> int | None:
    for replica in replicas:
        if requests.get(f"{replica['url']}/v1/alchemist/completions/{completion_id}", timeout=30).status_code == 200:
            return replica["index"]
    return None


def _chat(cluster, content: str, stream: bool = False) -> str:
    response = requests.post(cluster.url + "/v1/chat/completions", timeout=120, stream=stream, json={
        "model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
        "temperature": 0, "stream": stream,
    })
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()["id"]
    events = [line for line in response.iter_lines() if line.startswith(b"data: {")]
    assert events, "no event in the stream"
    return json.loads(events[0][len(b"data: "):])["id"]


def _feedback(cluster, completion_id: str, correction: str) -> str:
    response = requests.post(cluster.url + "/v1/feedback", timeout=120,
                             json={"id": completion_id, "type": "correction", "completion": correction})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _wait_trained(cluster, feedback_ids: list[str], timeout_s: float = 300) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    records = {}
    while time.monotonic() < deadline:
        for feedback_id in feedback_ids:
            response = requests.get(f"{cluster.url}/v1/alchemist/feedback/{feedback_id}", timeout=30)
            if response.status_code == 200:
                records[feedback_id] = response.json()
        if all(records.get(f, {}).get("state") == "trained" for f in feedback_ids):
            return records
        time.sleep(1.0)
    raise AssertionError(f"feedback not trained in time: {records}")


def _wait_same_version(cluster, at_least: int, timeout_s: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replicas = _replicas(cluster)
        served = {r["served_version"] for r in replicas}
        if len(served) == 1 and None not in served and served.pop() >= at_least:
            return replicas
        time.sleep(1.0)
    raise AssertionError(f"replicas do not serve one version >= {at_least}: {replicas}")


def _assert_identical_adapters(cluster, replicas: list[dict]) -> None:
    from safetensors.torch import load_file

    manifests = [json.loads((Path(r["state_dir"]) / "adapters" / "versions.json").read_text()) for r in replicas]
    versions = [sorted(v["version"] for v in m["versions"]) for m in manifests]
    assert versions[0] == versions[1], f"the replicas published different versions: {versions}"
    assert manifests[0]["current"] == manifests[1]["current"]
    for version in versions[0][1:]:
        files = [Path(r["state_dir"]) / "adapters" / f"v{version}" / "adapter_model.safetensors" for r in replicas]
        if not all(f.exists() for f in files):
            continue  # removed by retention on both
        first, second = load_file(files[0]), load_file(files[1])
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name], second[name]), f"v{version} {name} differs between the replicas"


def test_chats_reach_both_replicas_and_feedback_trains_one_lineage(cluster):
    replicas = _replicas(cluster)
    assert [r["index"] for r in replicas] == [0, 1] and all(r["healthy"] for r in replicas)
    ids = [_chat(cluster, f"Question number {i}?", stream=i % 2 == 1) for i in range(4)]
    served = {completion_id: _served_by(replicas, completion_id) for completion_id in ids}
    assert set(served.values()) == {0, 1}, served  # round-robin: both replicas answered
    # one feedback for a completion of each replica, through the front door
    chosen = [next(c for c, r in served.items() if r == index) for index in (0, 1)]
    feedback_ids = [_feedback(cluster, chosen[0], "Zorblat is the answer."),
                    _feedback(cluster, chosen[1], "Quinterra, surely.")]
    records = _wait_trained(cluster, feedback_ids)
    version = max(r["trained_version"] for r in records.values())
    replicas = _wait_same_version(cluster, version)
    _assert_identical_adapters(cluster, replicas)
    # an unknown id gets the replica's own 404 in the OpenAI format
    response = requests.post(cluster.url + "/v1/feedback", timeout=60,
                             json={"id": "no-such-id", "type": "accept"})
    assert response.status_code == 404 and response.json()["error"]["code"] == 404
    # an exchange the cluster did not serve (no id) goes to any replica
    response = requests.post(cluster.url + "/v1/feedback", timeout=60, json={
        "messages": [{"role": "user", "content": "Capital of Veltoria?"}], "completion": "Orsanne."})
    assert response.status_code == 202, response.text


@pytest.mark.slow
def test_kill_9_of_a_replica_loses_no_acknowledged_feedback_and_it_rejoins(cluster):
    replicas = _replicas(cluster)
    before = replicas[1]
    completion_id = None
    for i in range(6):
        candidate = _chat(cluster, f"Tell me about item {i}.")
        if _served_by(replicas, candidate) == 1:
            completion_id = candidate
            break
    assert completion_id is not None, "replica 1 served nothing"
    feedback_id = _feedback(cluster, completion_id, "Item facts, corrected.")  # acknowledged: 202
    os.killpg(before["pid"], signal.SIGKILL)  # a crash of the whole replica, right after the 202
    # the other replica keeps serving through the front door meanwhile
    for i in range(3):
        _chat(cluster, f"While replica 1 is down {i}?")
    records = _wait_trained(cluster, [feedback_id], timeout_s=600)
    after = _wait_same_version(cluster, records[feedback_id]["trained_version"], timeout_s=120)
    assert after[1]["restarts"] == before["restarts"] + 1 and after[1]["pid"] != before["pid"]
    _assert_identical_adapters(cluster, after)
    deadline = time.monotonic() + 120  # the front door's health check sees it back (it polls every second)
    while not all(r["healthy"] for r in _replicas(cluster)) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert all(r["healthy"] for r in _replicas(cluster))
    ids = [_chat(cluster, f"After the restart {i}?") for i in range(2)]
    assert {_served_by(after, i) for i in ids} == {0, 1}  # both replicas serve again
