"""Cluster scaling: serving and training throughput with 1 and 2 replicas behind the front door.

For each replica count N in ``--replicas`` (default ``1,2``) one ``python -m
sglang_alchemist.launch_cluster --replicas N`` is started (N = 1 too, so both sides pay the
same front-door proxy) and measured at its front door:

1. **Serving**, training paused (``POST /v1/alchemist/pause``, which the front door sends to
   every replica): a closed loop of ``--concurrency`` clients, each sending its next chat as
   soon as the last one answers (``--output-len`` tokens, ``ignore_eos``, greedy), for
   ``--serving-requests`` requests after a short warm-up. Reported: requests/s and output
   tokens/s (from ``usage``), latency p50/p90.
2. **Training**, still paused: a warm-up of ``--warmup-feedback`` corrections per replica is
   trained first (the first round pays one-time costs); then ``--backlog`` chats are served and
   each is corrected (``POST /v1/feedback {"id", "type": "correction", "completion"}``; the
   front door sends it to the replica that served the completion, so round-robin gives each
   replica about K/N of them). Training is resumed and timed until every replica's journal has
   nothing queued and all K are journaled ``trained`` (or ``rejected``/``dropped``, counted
   separately). Reported: feedback trained per second and optimizer steps per second of the
   lineage (every replica applies the same averaged step; the count is replica 0's), and the
   lockstep rounds. With 2 replicas each lockstep round trains up to one feedback per replica
   with one averaged optimizer step, so ideally a round costs one step's time and trains two.

The scaling ratios 2-replica / 1-replica are reported for both. On a machine whose replicas
share the same cores (a 2-core CPU here) no speed-up is expected: the figure then shows what
the lockstep (gradient all-reduce, agreement collectives, waiting for the slower replica)
costs, not the speed-up of separate machines.

Training flags (script defaults, chosen so that the tiny random model trains fast and every
feedback is one optimizer step): ``--gate-max-regressions -1`` (publish gate off: a random
model has no knowledge to guard), ``--passes 1``, ``--rehearsal 0``, ``--replay-feedback 0``.
Any other launcher flag goes after ``--``.

``--replicas 1,2,2,1`` measures each count twice in alternating order (a new cluster each time)
and reports the median of each figure: on a shared, noisy machine it cancels part of the drift.

The default model is the tiny random test model (``assets/tiny_model.py``, built in a temp dir,
fp32, a small KV pool): the whole run takes a few minutes on CPU. ``--model-path`` selects
another, e.g. SmolLM2 (``python -c "from sglang_alchemist.assets import smollm2;
print(smollm2.default_model_dir())"``).

    .venv/bin/python benchmark/cluster_scaling.py --output benchmark/results/cluster_scaling.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_alchemist.tools.server_process import ClusterProcess  # noqa: E402

from common import RESULTS_DIR, command_line, machine, write_json  # noqa: E402

TIMEOUT_S = 600
TOPICS = ["rivers", "volcanoes", "bread", "comets", "violins", "glaciers", "bees", "lighthouses", "maps",
          "chess", "tides", "copper", "owls", "deserts", "kites", "coral"]


@contextlib.contextmanager
def launched_cluster(args: list[str], name: str) -> Iterator[ClusterProcess]:
    """A cluster for the duration of one measurement; its logs (launcher, replicas) go to results/logs/."""
    cluster = ClusterProcess(args=list(args), log_path=RESULTS_DIR / "logs" / f"{name}.log")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def post(url: str, path: str, body: dict | None = None) -> requests.Response:
    response = requests.post(url + path, json=body or {}, timeout=TIMEOUT_S)
    response.raise_for_status()
    return response


def prompt(index: int, words: int) -> str:
    topic = TOPICS[index % len(TOPICS)]
    filler = " ".join(f"{TOPICS[(index + k) % len(TOPICS)]}" for k in range(max(words - 8, 0)))
    return f"Question {index}: tell me what you know about {topic}. {filler}".strip()


def chat(session: requests.Session, url: str, content: str, max_tokens: int) -> dict:
    response = session.post(url + "/v1/chat/completions", timeout=TIMEOUT_S, json={
        "model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True,
    })
    response.raise_for_status()
    return response.json()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def closed_loop(url: str, requests_total: int, concurrency: int, output_len: int, prompt_words: int,
                offset: int) -> dict:
    """``concurrency`` clients, each sending its next chat when the last one answered."""
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    tokens = [0, 0]  # completion, prompt
    errors: list[str] = []

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                if next_index[0] >= requests_total or errors:
                    return
                index = next_index[0]
                next_index[0] += 1
            started = time.perf_counter()
            try:
                usage = chat(session, url, prompt(offset + index, prompt_words), output_len)["usage"]
            except Exception as error:  # noqa: BLE001 - reported after the loop
                with lock:
                    errors.append(repr(error))
                return
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += usage["completion_tokens"]
                tokens[1] += usage["prompt_tokens"]

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} chat request(s) failed, first: {errors[0]}")
    return {"requests": len(latencies), "concurrency": concurrency, "duration_s": elapsed,
            "request_throughput": len(latencies) / elapsed, "output_throughput": tokens[0] / elapsed,
            "output_tokens": tokens[0], "prompt_tokens": tokens[1],
            "latency_s": {"p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
                          "max": max(latencies) if latencies else None}}


def replica_statuses(cluster: ClusterProcess) -> list[dict]:
    """Each replica's own ``/v1/alchemist/status`` (asked directly: the front door answers replica 0's)."""
    statuses = []
    for replica in cluster.remember_replicas():
        status = requests.get(replica["url"] + "/v1/alchemist/status", timeout=60).json()
        statuses.append({"index": replica["index"], "restarts": replica["restarts"],
                         "served_version": status["serving"]["served_version"], **status["schedulers"][0]})
    return statuses


def journal_totals(statuses: list[dict]) -> dict:
    return {state: sum(s["journal"][state] for s in statuses) for state in ("queued", "trained", "rejected",
                                                                             "dropped", "total")}


def submit_corrections(url: str, count: int, offset: int, prompt_words: int, correction: str) -> list[str]:
    """Serve ``count`` chats through the front door and correct each one (feedback reaches its replica)."""
    session = requests.Session()
    ids = []
    for index in range(count):
        served = chat(session, url, prompt(offset + index, prompt_words), 2)
        response = session.post(url + "/v1/feedback", timeout=TIMEOUT_S, json={
            "id": served["id"], "type": "correction", "completion": f"{correction} ({TOPICS[index % len(TOPICS)]})"})
        if response.status_code != 202:
            raise RuntimeError(f"feedback refused: {response.status_code} {response.text[:500]}")
        ids.append(response.json()["id"])
    return ids


def train_backlog(cluster: ClusterProcess, count: int, offset: int, prompt_words: int, correction: str,
                  timeout_s: float) -> dict:
    """Queue ``count`` corrections while paused, resume, and time until every one is journaled done."""
    url = cluster.url
    post(url, "/v1/alchemist/pause")
    before = replica_statuses(cluster)
    submit_corrections(url, count, offset, prompt_words, correction)
    queued = replica_statuses(cluster)
    per_replica = [q["journal"]["total"] - b["journal"]["total"] for b, q in zip(before, queued, strict=True)]
    start_totals = journal_totals(before)
    post(url, "/v1/alchemist/resume")
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = replica_statuses(cluster)
        totals = journal_totals(statuses)
        done = sum(totals[s] - start_totals[s] for s in ("trained", "rejected", "dropped"))
        busy = any(s["training"]["step_in_progress"] or s["training"]["queue_depth"] for s in statuses)
        if done >= count and totals["queued"] == 0 and not busy:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"backlog not trained in {timeout_s:.0f} s: {done}/{count} done, journal {totals}")
        time.sleep(0.25)
    elapsed = time.perf_counter() - started
    post(url, "/v1/alchemist/pause")
    steps = statuses[0]["training"]["optimizer_steps"] - before[0]["training"]["optimizer_steps"]
    delta = {s: totals[s] - start_totals[s] for s in ("trained", "rejected", "dropped")}
    result = {"feedback": count, "per_replica_feedback": per_replica, "duration_s": elapsed, **delta,
              "optimizer_steps": steps, "feedback_per_s": delta["trained"] / elapsed, "steps_per_s": steps / elapsed,
              "served_versions": [s["served_version"] for s in statuses],
              "restarts": [s["restarts"] for s in statuses]}
    clusters = [(b["training"].get("cluster"), s["training"].get("cluster")) for b, s in zip(before, statuses,
                                                                                            strict=True)]
    if clusters[0][0] is not None:
        first_before, first_after = clusters[0]
        result["lockstep"] = {key: first_after[key] - first_before[key]
                              for key in ("rounds", "idle_rounds", "rounds_accepted", "rounds_rejected",
                                          "abandoned_rounds", "divergences_repaired")}
    return result


def measure(replicas: int, server_args: list[str], args, state_root: Path) -> dict:
    state = state_root / f"replicas-{replicas}"
    cluster_args = ["--replicas", str(replicas), *server_args, "--alchemist-state-dir", str(state)]
    name = f"cluster-scaling-{replicas}-{state_root.name}"
    started = time.perf_counter()
    try:
        with launched_cluster(cluster_args, name=name) as cluster:
            startup_s = time.perf_counter() - started
            print(f"{replicas} replica(s): healthy after {startup_s:.0f} s", flush=True)
            url = cluster.url
            post(url, "/v1/alchemist/pause")
            closed_loop(url, max(2 * args.concurrency, 4), args.concurrency, args.output_len, args.prompt_words,
                        offset=10_000)
            serving = closed_loop(url, args.serving_requests, args.concurrency, args.output_len, args.prompt_words,
                                  offset=0)
            print(f"{replicas} replica(s) serving: {serving['request_throughput']:.2f} req/s, "
                  f"{serving['output_throughput']:.1f} output tok/s", flush=True)
            warmup = None
            if args.warmup_feedback:
                warmup = train_backlog(cluster, args.warmup_feedback * replicas, 20_000, args.prompt_words,
                                       args.correction, args.train_timeout_s)
            training = train_backlog(cluster, args.backlog, 30_000, args.prompt_words, args.correction,
                                     args.train_timeout_s)
            print(f"{replicas} replica(s) training: {training['trained']}/{args.backlog} feedback in "
                  f"{training['duration_s']:.1f} s = {training['feedback_per_s']:.2f} feedback/s, "
                  f"{training['steps_per_s']:.2f} steps/s", flush=True)
            statuses = replica_statuses(cluster)
            config = statuses[0]["config"] if "config" in statuses[0] else None
    finally:
        for log in sorted(state.glob("replica-*.log")):  # the replicas' logs live in the temp state dir
            shutil.copy(log, RESULTS_DIR / "logs" / f"{name}-{log.name}")
    return {"replicas": replicas, "startup_s": startup_s, "serving": serving, "training_warmup": warmup,
            "training": training, "config": config}


def aggregate(runs: list[dict]) -> dict:
    """One row per replica count: the median over its runs of every number (the first run's other values)."""
    def median_of(values: list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return statistics.median(values)
        if all(isinstance(v, dict) for v in values):
            return {key: median_of([v.get(key) for v in values]) for key in values[0]}
        return values[0]

    row = {key: median_of([run[key] for run in runs]) for key in ("startup_s", "serving", "training")}
    return {"replicas": runs[0]["replicas"], "runs": len(runs), **row, "config": runs[0]["config"]}


def ratio(rows: dict[int, dict], section: str, key: str) -> float | None:
    if 1 not in rows or 2 not in rows or not rows[1][section][key]:
        return None
    return rows[2][section][key] / rows[1][section][key]


def markdown(rows: dict[int, dict], ratios: dict, cores: int | None) -> str:
    lines = ["| replicas | serving req/s | output tok/s | latency p50 / p90 (s) | feedback trained/s | "
             "optimizer steps/s (lineage) | trained / backlog (per replica) | lockstep rounds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, row in sorted(rows.items()):
        serving, training = row["serving"], row["training"]
        rounds = training.get("lockstep", {}).get("rounds")
        rounds = "-" if rounds is None else f"{rounds:g}"
        lines.append(
            f"| {n} | {serving['request_throughput']:.2f} | {serving['output_throughput']:.1f} | "
            f"{serving['latency_s']['p50']:.2f} / {serving['latency_s']['p90']:.2f} | "
            f"{training['feedback_per_s']:.2f} | {training['steps_per_s']:.2f} | {training['trained']:g} / "
            f"{training['feedback']:g} ({', '.join(map(str, training['per_replica_feedback']))}) | {rounds} |")
    if all(value is not None for value in ratios.values()):
        lines.append(f"| **2 / 1** | **{ratios['serving_requests']:.2f}x** | **{ratios['serving_tokens']:.2f}x** | | "
                     f"**{ratios['feedback_per_s']:.2f}x** | {ratios['steps_per_s']:.2f}x | | |")
    repeated = {n: row["runs"] for n, row in rows.items() if row.get("runs", 1) > 1}
    if repeated:
        lines += ["", "Medians over " + ", ".join(f"{runs} runs of {n} replica(s)" for n, runs in repeated.items())
                  + " (a new cluster each run, alternating order)."]
    lines += ["", f"Both replicas run on this one machine ({cores} CPU cores): they share the same cores, so no "
              "speed-up is expected here; the 2/1 ratios show the overhead of the front door's round-robin and of "
              "the lockstep (every optimizer step's gradients averaged over a gloo group, agreement collectives, "
              "waiting for the slower replica), not what replicas on separate machines or GPUs gain. With 2 "
              "replicas each lockstep round trains up to one feedback per replica with one averaged optimizer "
              "step, so the lineage takes about half as many steps for the same feedback; on separate hardware "
              "the ideal feedback-trained ratio is 2x."]
    rejected = {n: (r["training"]["rejected"], r["training"]["dropped"]) for n, r in rows.items()
                if r["training"]["rejected"] or r["training"]["dropped"]}
    if rejected:
        lines.append("")
        lines.append("Not trained (rejected, dropped): " + "; ".join(f"{n} replica(s): {v}" for n, v in rejected.items()))
    return "\n".join(lines)


def plot(rows: dict[int, dict], ratios: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(rows)
    labels = [f"{n} replica{'s' if n > 1 else ''}" for n in counts]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = ((axes[0], "serving", "request_throughput", "serving requests/s (training paused)", "serving_requests"),
              (axes[1], "serving", "output_throughput", "serving output tokens/s", "serving_tokens"),
              (axes[2], "training", "feedback_per_s", "feedback trained/s", "feedback_per_s"))
    for axis, section, key, title, ratio_key in panels:
        values = [rows[n][section][key] for n in counts]
        bars = axis.bar(labels, values, color=["tab:blue", "tab:orange", "tab:green"][: len(counts)])
        axis.bar_label(bars, fmt="%.2f")
        axis.set_ylabel(title)
        if ratios.get(ratio_key) is not None:
            axis.set_title(f"2 / 1 = {ratios[ratio_key]:.2f}x")
    steps = [rows[n]["training"]["steps_per_s"] for n in counts]
    axes[2].plot(labels, steps, "k^--", label="optimizer steps/s (lineage)")
    axes[2].legend()
    figure.suptitle(f"replicas on one machine ({os.cpu_count()} CPU cores): they share the cores")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="default: the tiny random test model, built in a temp dir")
    parser.add_argument("--replicas", default="1,2", help="replica counts to measure, comma-separated")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop serving clients")
    parser.add_argument("--serving-requests", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--backlog", type=int, default=32, help="corrections trained and timed (K)")
    parser.add_argument("--warmup-feedback", type=int, default=2, help="warm-up corrections per replica (0: none)")
    parser.add_argument("--correction", default="The answer, corrected by a user, is this sentence")
    parser.add_argument("--train-timeout-s", type=float, default=1800.0)
    parser.add_argument("--gate-max-regressions", type=int, default=-1)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--rehearsal", type=int, default=0)
    parser.add_argument("--replay-feedback", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "cluster_scaling.json")
    parser.add_argument("server_args", nargs="*", help="extra launcher flags (after --)")
    args = parser.parse_args()

    def interrupted(signum, frame):  # run the finally blocks (stop every cluster) on SIGTERM too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    counts = [int(n) for n in args.replicas.split(",")]
    training_flags = ["--alchemist-gate-max-regressions", str(args.gate_max_regressions),
                      "--alchemist-passes", str(args.passes), "--alchemist-rehearsal", str(args.rehearsal),
                      "--alchemist-replay-feedback", str(args.replay_feedback)]
    runs: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="cluster-scaling-") as temp:
        if args.model_path is None:
            from sglang_alchemist.assets.tiny_model import build_tiny_model

            model_path = str(build_tiny_model(Path(temp) / "tiny-model"))
            model_flags = ["--model-path", model_path, "--dtype", "float32", "--max-total-tokens", "8192"]
            model_name = "tiny random Llama (assets/tiny_model.py)"
        else:
            model_path = args.model_path
            model_flags = ["--model-path", model_path]
            model_name = model_path
        server_args = [*model_flags, *training_flags, *args.server_args]
        (RESULTS_DIR / "logs").mkdir(parents=True, exist_ok=True)
        for index, n in enumerate(counts):
            runs.setdefault(n, []).append(measure(n, server_args, args, Path(temp) / "state" / f"run-{index}"))
    rows = {n: aggregate(measured) for n, measured in runs.items()}
    ratios = {"serving_requests": ratio(rows, "serving", "request_throughput"),
              "serving_tokens": ratio(rows, "serving", "output_throughput"),
              "feedback_per_s": ratio(rows, "training", "feedback_per_s"),
              "steps_per_s": ratio(rows, "training", "steps_per_s")}
    result = {"command": command_line(), "machine": {**machine(), "os_cpu_count": os.cpu_count()},
              "model": model_name, "launcher_flags": [a for a in server_args if a != model_path],
              "settings": {k: v for k, v in vars(args).items() if k not in ("output", "server_args")},
              "rows": {str(n): row for n, row in rows.items()},
              "runs": [run for n in sorted(runs) for run in runs[n]], "scaling_2_over_1": ratios}
    result["markdown"] = markdown(rows, ratios, os.cpu_count())
    write_json(args.output, result)
    plot(rows, ratios, args.output.with_suffix(".png"))
    print(result["markdown"])
    print(f"written: {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
