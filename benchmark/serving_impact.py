"""What training costs serving latency: TTFT/TPOT with training off vs on, at fixed request rates.

One server (recording on). For each request rate, SGLang's own ``python -m
sglang.benchmark.serving`` runs the same ShareGPT prompts twice, in alternating order:

- **off**: training paused, no backlog;
- **on**: a backlog of feedback on served ShareGPT responses (corrections = the ShareGPT reply,
  recorded while served, so trained by replay) is waiting when the run starts and trains under
  the SLO controller while the load runs.

Reported per rate: TTFT and TPOT p50/p99 for both, on/off ratios, training tokens/s during the
"on" run, and the controller's SLO attainment. JSON, a Markdown table and a PNG plot.

The TPOT target is ``--tpot-slo-ms`` (500 ms): on a 2-core CPU, SmolLM2 serving *alone* takes
240-640 ms per output token at these rates, above the launcher's 200 ms default; a target that
serving itself misses leaves training no time while requests run (it waits for idle gaps).

    .venv/bin/python benchmark/serving_impact.py --rates 0.5,1,2 --output benchmark/results/serving_impact.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, launched_server, machine, write_json  # noqa: E402
from serving_bench import run_serving_benchmark, sharegpt_file  # noqa: E402

METRICS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")


def scheduler_status(url: str) -> dict:
    return requests.get(url + "/v1/alchemist/status", timeout=60).json()["schedulers"][0]


def post(url: str, path: str, body: dict | None = None) -> None:
    requests.post(url + path, json=body or {}, timeout=120).raise_for_status()


def build_backlog(url: str, tokenizer, count: int, seed: int, max_correction_tokens: int) -> None:
    """Serve ShareGPT prompts (recorded) and correct each with its ShareGPT reply, training paused."""
    from sglang_alchemist.assets import sharegpt

    post(url, "/v1/alchemist/pause")
    for pair, _, _ in sharegpt.pairs(tokenizer, limit=count, seed=seed):
        served = requests.post(url + "/v1/chat/completions", timeout=600, json={
            "model": "default", "messages": [{"role": "user", "content": pair.prompt}], "max_tokens": 4,
        }).json()
        correction = tokenizer.decode(tokenizer.encode(pair.response, add_special_tokens=False)[:max_correction_tokens])
        requests.post(url + "/v1/feedback", timeout=600,
                      json={"id": served["id"], "type": "correction", "completion": correction}).raise_for_status()


def measure(url: str, model_path: str, dataset: Path, rate: float, num_prompts: int, output_len: int,
            training: bool, tokenizer, backlog: int, seed: int) -> dict:
    if training:
        build_backlog(url, tokenizer, backlog, seed=seed + 100, max_correction_tokens=128)
        before = scheduler_status(url)
        post(url, "/v1/alchemist/resume")
    else:
        post(url, "/v1/alchemist/pause")
        before = scheduler_status(url)
    started = time.monotonic()
    result = run_serving_benchmark(url, model_path, dataset, num_prompts, rate, output_len,
                                   RESULTS_DIR / "tmp" / f"impact-{rate}-{'on' if training else 'off'}.jsonl",
                                   seed=seed)
    elapsed = time.monotonic() - started
    after = scheduler_status(url)
    trained_tokens = after["training"]["tokens_trained"] - before["training"]["tokens_trained"]
    controller = after["scheduler"]
    steps = controller["decode_steps"] - before["scheduler"]["decode_steps"]
    within = controller["decode_steps_within_slo"] - before["scheduler"]["decode_steps_within_slo"]
    if training:
        post(url, "/v1/alchemist/pause")  # the rest of the backlog waits, out of the next run
    return {
        **{key: result[key] for key in METRICS}, "completed": result["completed"],
        "duration_s": result["duration"], "training_tokens": trained_tokens,
        "training_tokens_per_s": trained_tokens / elapsed,
        "decode_steps": steps, "slo_attainment": within / steps if steps else None,
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| req/s | TTFT p50 off -> on (ms) | TTFT p99 off -> on | TPOT p50 off -> on | TPOT p99 off -> on "
             "| TPOT p99 ratio | training tok/s | SLO attainment |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        off, on = row["off"], row["on"]
        attainment = "-" if on["slo_attainment"] is None else f"{on['slo_attainment']:.1%}"
        lines.append(
            f"| {row['rate']} | {off['median_ttft_ms']:.0f} -> {on['median_ttft_ms']:.0f} "
            f"| {off['p99_ttft_ms']:.0f} -> {on['p99_ttft_ms']:.0f} "
            f"| {off['median_tpot_ms']:.1f} -> {on['median_tpot_ms']:.1f} "
            f"| {off['p99_tpot_ms']:.1f} -> {on['p99_tpot_ms']:.1f} "
            f"| {on['p99_tpot_ms'] / off['p99_tpot_ms']:.2f} | {on['training_tokens_per_s']:.0f} | {attainment} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [row["rate"] for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for axis, metric, label in ((axes[0], "p99_ttft_ms", "TTFT p99 (ms)"), (axes[1], "p99_tpot_ms", "TPOT p99 (ms)")):
        for mode, style in (("off", "o-"), ("on", "s-")):
            axis.plot(rates, [row[mode][metric] for row in rows], style, label=f"training {mode}")
        axis.set_xlabel("request rate (req/s)")
        axis.set_ylabel(label)
        axis.legend()
    axes[2].bar([str(r) for r in rates], [row["on"]["training_tokens_per_s"] for row in rows], color="tab:green")
    axes[2].set_xlabel("request rate (req/s)")
    axes[2].set_ylabel("training tokens/s while serving")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    from transformers import AutoTokenizer

    from sglang_alchemist.assets import smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=str(smollm2.default_model_dir()))
    parser.add_argument("--rates", default="0.5,1,2")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--backlog", type=int, default=24)
    parser.add_argument("--tpot-slo-ms", type=float, default=500.0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "serving_impact.json")
    parser.add_argument("server_args", nargs="*", help="extra launcher flags (after --)")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    dataset = sharegpt_file(tokenizer)
    rows = []
    with tempfile.TemporaryDirectory() as state_dir:
        server_args = ["--model-path", args.model_path, "--alchemist-state-dir", state_dir,
                       "--alchemist-tpot-slo-ms", str(args.tpot_slo_ms), *args.server_args]
        with launched_server(server_args, name="serving-impact") as server:
            config = scheduler_status(server.url)["config"]
            for index, rate in enumerate(float(r) for r in args.rates.split(",")):
                row = {"rate": rate}
                for training in ((False, True) if index % 2 == 0 else (True, False)):
                    mode = "on" if training else "off"
                    row[mode] = measure(server.url, args.model_path, dataset, rate, args.num_prompts,
                                        args.output_len, training, tokenizer, args.backlog, seed=index)
                    print(f"rate {rate} training {mode}: TPOT p99 {row[mode]['p99_tpot_ms']:.1f} ms, "
                          f"TTFT p99 {row[mode]['p99_ttft_ms']:.0f} ms", flush=True)
                rows.append(row)
            post(server.url, "/v1/alchemist/resume")
    result = {"command": command_line(), "machine": machine(), "model": args.model_path, "config": config,
              "rows": rows, "markdown": markdown(rows)}
    write_json(args.output, result)
    plot(rows, args.output.with_suffix(".png"))
    print(result["markdown"])
    print(f"written: {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
