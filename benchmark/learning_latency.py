"""How soon a correction is learnt where the user sees it: through the server, from the feedback to its served version.

The protocol (SmolLM2-135M-Instruct, default flags, a fresh state directory, invented facts from
``benchmark/data/facts.json``), each correction sent on the id of the answer it corrects:

1. **fresh**: a newly started server is corrected as soon as ``/health`` answers (its learner
   statistics come from the cache ``scripts/setup.sh`` filled);
2. **one at a time**: ``--one-at-a-time`` facts, each corrected once the previous one is served;
3. **burst**: ``--burst`` facts asked, then all corrected back to back.

For every correction: seconds from the ``POST /v1/feedback`` to the moment the version that
contains it is served (polled every 0.25 s: its journal record is ``trained`` and the served
version is at least that one), and **immediate recall**: the corrected question asked again at
that moment (greedy, 32 tokens, right = the fact's key is in the answer). Then the held-out
controls (general questions the base model answers right, never asked before) and the status's
``training.reuse_ratio`` over the whole run.

    .venv/bin/python benchmark/learning_latency.py --output benchmark/results/learning_latency.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, launched_server, machine, provenance, write_json  # noqa: E402
from quality import Client, load_split, score  # noqa: E402

POLL_S = 0.25


def served_in(client: Client, feedback_id: str, sent_at: float, timeout_s: float) -> dict:
    """Wait until the version containing ``feedback_id`` is served; the record and the seconds it took."""
    deadline = sent_at + timeout_s
    while time.monotonic() < deadline:
        record = client.get(f"/v1/alchemist/feedback/{feedback_id}")
        if record["state"] in ("rejected", "dropped"):
            return {"record": record, "seconds": None}
        if record["state"] == "trained":
            served = client.get("/v1/alchemist/status")["serving"]["served_version"]
            if served >= record["trained_version"]:
                return {"record": record, "seconds": time.monotonic() - sent_at}
        time.sleep(POLL_S)
    return {"record": client.get(f"/v1/alchemist/feedback/{feedback_id}"), "seconds": None}


def correct(client: Client, fact: dict) -> tuple[str, float]:
    served = client.ask(fact["question"], max_tokens=32)
    sent_at = time.monotonic()
    reply = client.feedback({"id": served["id"], "type": "correction", "completion": fact["answer"]})
    return reply["id"], sent_at


def recall(client: Client, fact: dict) -> dict:
    answer = client.ask(fact["question"], max_tokens=32)
    text = answer["choices"][0]["message"]["content"]
    return {"answer": text, "right": any(key.lower() in text.lower() for key in fact["keys"]),
            "adapter_applied": (answer.get("metadata") or {}).get("alchemist_adapter_applied")}


def one_by_one(client: Client, facts: list[dict], timeout_s: float) -> list[dict]:
    rows = []
    for fact in facts:
        feedback_id, sent_at = correct(client, fact)
        waited = served_in(client, feedback_id, sent_at, timeout_s)
        rows.append({"question": fact["question"], "seconds": waited["seconds"], "steps": waited["record"]["steps"],
                     "learnt": waited["record"]["learnt"], **recall(client, fact)})
        print(f"  {fact['question'][:50]!r}: {rows[-1]['seconds'] or float('nan'):.1f} s, steps {rows[-1]['steps']}, "
              f"learnt {rows[-1]['learnt']}, right {rows[-1]['right']}", flush=True)
    return rows


def burst(client: Client, facts: list[dict], timeout_s: float) -> dict:
    served = [client.ask(fact["question"], max_tokens=32) for fact in facts]
    sent = []
    for fact, answer in zip(facts, served, strict=True):
        sent_at = time.monotonic()
        reply = client.feedback({"id": answer["id"], "type": "correction", "completion": fact["answer"]})
        sent.append((reply["id"], sent_at))
    last_sent = sent[-1][1]
    rows = []
    for fact, (feedback_id, sent_at) in zip(facts, sent, strict=True):
        waited = served_in(client, feedback_id, sent_at, timeout_s)
        served_at = None if waited["seconds"] is None else sent_at + waited["seconds"]
        rows.append({"question": fact["question"], "seconds": waited["seconds"],
                     "after_last_s": None if served_at is None else served_at - last_sent,
                     "steps": waited["record"]["steps"], "learnt": waited["record"]["learnt"],
                     "trained_version": waited["record"]["trained_version"]})
    for row, fact in zip(rows, facts, strict=True):
        row.update(recall(client, fact))
    done = [row["after_last_s"] for row in rows if row["after_last_s"] is not None]
    return {"corrections": rows, "all_served_after_last_s": max(done) if len(done) == len(rows) else None,
            "versions": len({row["trained_version"] for row in rows})}


def summary(rows: list[dict]) -> dict:
    seconds = [row["seconds"] for row in rows if row["seconds"] is not None]
    return {"count": len(rows), "right": sum(row["right"] for row in rows),
            "learnt": sum(1 for row in rows if row["learnt"]),
            "median_s": statistics.median(seconds) if seconds else None, "max_s": max(seconds) if seconds else None,
            "served": len(seconds)}


def run(args) -> dict:
    report, controls = load_split("report")
    tune, _ = load_split("tune")
    facts = report + tune
    needed = 1 + args.one_at_a_time + args.burst
    if needed > len(facts):
        raise SystemExit(f"{needed} facts needed, {len(facts)} in benchmark/data/facts.json")
    fresh_fact, singles, bursts = facts[0], facts[1 : 1 + args.one_at_a_time], facts[1 + args.one_at_a_time : needed]
    with tempfile.TemporaryDirectory() as state_dir:
        started = time.monotonic()
        with launched_server(["--alchemist-state-dir", state_dir, *args.server_args], name="learning_latency") as server:
            healthy_s = time.monotonic() - started
            client = Client(server.url)
            print(f"healthy after {healthy_s:.0f} s; the fresh server's first correction:", flush=True)
            fresh = one_by_one(client, [fresh_fact], args.timeout_s)
            print(f"one at a time ({len(singles)}):", flush=True)
            single = one_by_one(client, singles, args.timeout_s)
            print(f"a burst of {len(bursts)}:", flush=True)
            burst_result = burst(client, bursts, args.timeout_s)
            print(f"  all served {burst_result['all_served_after_last_s']} s after the last correction, "
                  f"in {burst_result['versions']} version(s)", flush=True)
            held_out = score(client, [c["question"] for c in controls], [c["keys"] for c in controls])
            status = client.get("/v1/alchemist/status")
    training = status["schedulers"][0]["training"]
    return {
        "healthy_after_s": healthy_s,
        "fresh": {**summary(fresh), "corrections": fresh},
        "one_at_a_time": {**summary(single), "corrections": single},
        "burst": {**summary(burst_result["corrections"]), **burst_result},
        "controls": {"right": held_out["right"], "of": held_out["of"], "adapter_applied": held_out["adapter_applied"]},
        "reuse_ratio": training["reuse_ratio"], "layer_rows": training["layer_rows"],
        "layer_rows_reused": training["layer_rows_reused"], "optimizer_steps": training["optimizer_steps"],
        "checks": training["checks"], "busy_seconds": training["busy_seconds"],
        "updates": training["updates_completed"], "trunk": training["trunk"],
        "first_adapted_layer": training["trunk"]["first_adapted_layer"], "config": status["schedulers"][0]["config"],
    }


def markdown(result: dict) -> str:
    fresh, single, burst_ = result["fresh"], result["one_at_a_time"], result["burst"]

    def seconds(value):
        return "-" if value is None else f"{value:.0f}"

    lines = ["| phase | corrections | feedback -> served version, median / max (s) | learnt by the check | "
             "right when asked again at once |", "| --- | --- | --- | --- | --- |",
             f"| fresh server, first correction | {fresh['count']} | {seconds(fresh['median_s'])} / "
             f"{seconds(fresh['max_s'])} | {fresh['learnt']}/{fresh['count']} | {fresh['right']}/{fresh['count']} |",
             f"| one at a time, warm | {single['count']} | {seconds(single['median_s'])} / {seconds(single['max_s'])} | "
             f"{single['learnt']}/{single['count']} | {single['right']}/{single['count']} |",
             f"| burst | {burst_['count']} | {seconds(burst_['median_s'])} / {seconds(burst_['max_s'])} "
             f"(all served {seconds(burst_['all_served_after_last_s'])} s after the last, {burst_['versions']} "
             f"versions) | {burst_['learnt']}/{burst_['count']} | {burst_['right']}/{burst_['count']} |",
             "",
             f"Controls (never asked before): {result['controls']['right']}/{result['controls']['of']} right, "
             f"{result['controls']['adapter_applied']} answered with the adapter. Reuse ratio over the run: "
             f"{result['reuse_ratio']:.2f} ({result['layer_rows_reused']} of {result['layer_rows']} row-layer forwards "
             f"from records; adapter from layer {result['first_adapted_layer']}). {result['optimizer_steps']} optimizer "
             f"steps and {result['checks']} checks in {result['updates']} updates, {result['busy_seconds']:.0f} s of "
             f"the training thread. Server healthy {result['healthy_after_s']:.0f} s after launch."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    for index, phase in enumerate((result["fresh"], result["one_at_a_time"], result["burst"])):
        values = [row["seconds"] for row in phase["corrections"] if row["seconds"] is not None]
        axis.scatter([index] * len(values), values, alpha=0.7)
    axis.set_xticks([0, 1, 2], ["fresh server", "one at a time", "burst"])
    axis.set_ylabel("feedback -> served version (s)")
    axis.set_title("Corrections: time until the version that learnt them is served")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one-at-a-time", type=int, default=8)
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "learning_latency.json")
    parser.add_argument("server_args", nargs="*", help="extra launcher flags (after --)")
    args = parser.parse_args()
    result = run(args)
    result.update(command=command_line(), machine=machine(), provenance=provenance([]), markdown=markdown(result))
    write_json(args.output, result)
    plot(result, args.output.with_suffix(".png"))
    print(result["markdown"])
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
