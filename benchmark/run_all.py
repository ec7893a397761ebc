"""Run the whole benchmark suite and write the summary that the README shows.

    .venv/bin/python benchmark/run_all.py            # all four benchmarks, then the summary
    .venv/bin/python benchmark/run_all.py --summary-only   # rebuild the summary from existing JSON

Each benchmark writes its JSON (and PNG) under ``benchmark/results/``; this script then writes
``benchmark/results/summary.md``: our ratios beside the Alchemist paper's claims, with the
conditions and the command behind each figure. ``--write-readme`` copies the summary into the
README between its ``results`` markers (a test checks the two agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
START, END = "<!-- results:start", "<!-- results:end -->"

BENCHMARKS = [
    ("recording_overhead", ["benchmark/recording_overhead.py"]),
    ("train_throughput", ["benchmark/train_throughput.py"]),
    ("serving_impact", ["benchmark/serving_impact.py"]),
    ("quality", ["benchmark/quality.py"]),
]


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def summary() -> str:
    recording, training, impact, quality = (load(name) for name, _ in BENCHMARKS)
    lines = ["### Measured results (CPU, SmolLM2-135M-Instruct, fp32)", ""]
    machine = next((r["machine"] for r in (training, recording, impact) if r), None)
    if machine:
        lines.append(f"Machine: {machine['cpu_count']} CPU threads, torch {machine['torch']}, "
                     f"CUDA: {machine['cuda'] or 'none'}; commit {machine.get('git_commit', '?')}, {machine['time']}.")
        lines.append("")
    lines += ["| claim (Alchemist paper, vs a separate trainer) | paper | ours | conditions |",
              "| --- | --- | --- | --- |"]
    if training:
        mixes = {m["mix"]: m for m in training["mixes"]}
        best = max(training["mixes"], key=lambda m: m["throughput_ratio"])
        share = mixes.get("ShareGPT")
        lines.append(f"| training throughput | up to 1.72x | {best['throughput_ratio']:.2f}x ({best['mix']}); "
                     f"{share['throughput_ratio']:.2f}x (ShareGPT mix) | replay vs recompute, same samples, LoRA r8 "
                     f"all projections, forward+backward |")
        memory = 1 - best["peak_saved_bytes_replay"] / best["peak_saved_bytes_recompute"]
        lines.append(f"| training memory | 47% less | {memory:.0%} less saved activations ({best['mix']}: "
                     f"{best['peak_saved_bytes_recompute'] / 2**20:.0f} -> {best['peak_saved_bytes_replay'] / 2**20:.0f} MB)"
                     " | peak activation bytes autograd keeps (weights excluded); records live in the store's tiers |")
        fit = training["fit"]
        lines.append(f"| trainable tokens at a fixed memory budget | 2x | {fit['trainable_tokens_ratio']:.2f}x "
                     f"({fit['max_prompt_tokens_recompute']:.0f} -> {fit['max_prompt_tokens_replay']:.0f} prompt tokens) "
                     f"| {fit['budget_bytes'] / 2**20:.0f} MB of saved activations, target {fit['target_tokens']} tokens |")
    if impact:
        worst = max(row["on"]["p99_tpot_ms"] / row["off"]["p99_tpot_ms"] for row in impact["rows"])
        worst_ttft = max(row["on"]["p99_ttft_ms"] / row["off"]["p99_ttft_ms"] for row in impact["rows"])
        attainment = min((row["on"]["slo_attainment"] for row in impact["rows"]
                          if row["on"]["slo_attainment"] is not None), default=None)
        att = "-" if attainment is None else f"{attainment:.1%}"
        lines.append(f"| serving latency impact | negligible | TPOT p99 x{worst:.2f}, TTFT p99 x{worst_ttft:.1f} at worst; "
                     f"SLO attainment >= {att} "
                     f"| {len(impact['rows'])} request rates, TPOT target {impact['config']['tpot_slo_ms']:.0f} ms |")
    if recording:
        lines.append(f"| recording overhead (ours only) | - | prefill throughput x"
                     f"{recording['median_throughput_ratio_all_over_none']:.2f} with recording | "
                     f"{recording['recorded_bytes_per_token'] / 1024:.0f} KiB recorded per prompt token |")
    if quality:
        b, a = quality["before"], quality["after"]
        lines.append(f"| learns from feedback (ours only) | - | facts {b['facts']['right']}/8 -> {a['facts']['right']}/8, "
                     f"paraphrases {b['paraphrases']['right']} -> {a['paraphrases']['right']}/8, controls "
                     f"{b['controls']['right']} -> {a['controls']['right']}/6 | {quality['rounds']} rounds of corrections "
                     "through /v1/feedback, project defaults |")
    lines.append("")
    for title, data in (("Training throughput and memory", training), ("Serving impact", impact),
                        ("Recording overhead", recording)):
        if data:
            lines += [f"#### {title}", "", f"`{data['command']}`", "", data["markdown"], ""]
    if quality:
        lines += ["#### Learning quality", "", "`.venv/bin/python benchmark/quality.py`", "",
                  "| set | before | after |", "| --- | --- | --- |"]
        for name in ("facts", "paraphrases", "controls"):
            lines.append(f"| {name} | {quality['before'][name]['right']}/{quality['before'][name]['of']} "
                         f"| {quality['after'][name]['right']}/{quality['after'][name]['of']} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def readme_with_summary(readme: str, text: str) -> str:
    head, rest = readme.split(START, 1)
    marker_line, _ = rest.split("\n", 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}{marker_line}\n{text}{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    if not args.summary_only:
        for name, command in BENCHMARKS:
            print(f"=== {name}", flush=True)
            subprocess.run([sys.executable, *command], check=True, cwd=HERE.parent)
    text = summary()
    (RESULTS / "summary.md").write_text(text)
    print(text)
    if args.write_readme:
        README.write_text(readme_with_summary(README.read_text(), text))
        print(f"README updated: {README}")


if __name__ == "__main__":
    main()
