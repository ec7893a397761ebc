"""Run the whole benchmark suite and write the summary that the README shows.

    .venv/bin/python benchmark/run_all.py            # every benchmark, then the summary
    .venv/bin/python benchmark/run_all.py --summary-only   # rebuild the summary from existing JSON

Each benchmark writes its JSON (and PNG) under ``benchmark/results/``; this script then writes
``benchmark/results/summary.md``: our ratios beside the Alchemist paper's claims, with the
conditions and the command behind each figure. ``--write-readme`` copies the summary into the
README between its ``results`` markers (a test checks the two agree).

Provenance: every result records the commit it ran at and whether the tree was clean
(``machine.git_commit`` / ``git_clean``), and a result derived from others lists them with their
commits (``provenance.inputs``). The summary names each result's commit and refuses
(:class:`InconsistentResults`) to show a derived result beside inputs that are not the ones it
was computed from - e.g. a saving computed from an earlier throughput run than the one shown.
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
    ("recipe_cost", ["benchmark/recipe_cost.py"]),
    ("learning_latency", ["benchmark/learning_latency.py"]),
    ("serving_impact", ["benchmark/serving_impact.py"]),
    ("scope_cost", ["benchmark/scope_cost.py", "--ttft"]),
    ("quality", ["benchmark/quality.py", "--split", "report"]),
]


# Benchmarks whose committed results are missing or from an earlier protocol, and why; the
# summary says so instead of showing figures (a test checks every other benchmark has results).
NOT_RUN: dict[str, str] = {}


class InconsistentResults(ValueError):
    """A derived result's inputs are not the result files it would be shown beside."""


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_provenance() -> None:
    """Every derived result was computed from the input files committed beside it (same commit, same time)."""
    for name, _ in BENCHMARKS:
        data = load(name)
        if data is None:
            continue
        for source in (data.get("provenance") or {}).get("inputs", []):
            current = load(Path(source["file"]).stem)
            made = (current or {}).get("machine", {})
            if current is None or (made.get("git_commit"), made.get("time")) != (source["git_commit"], source["time"]):
                raise InconsistentResults(
                    f"{name}.json was computed from {source['file']} at commit {source['git_commit']} "
                    f"({source['time']}), but the {source['file']} here is from commit {made.get('git_commit')} "
                    f"({made.get('time')}): rerun {name}")


def _made(data: dict) -> str:
    machine = data["machine"]
    clean = machine.get("git_clean")
    tree = "clean tree" if clean else "tree state not recorded" if clean is None else "uncommitted changes"
    inputs = (data.get("provenance") or {}).get("inputs", [])
    derived = "; from " + ", ".join(f"{i['file']} ({i['git_commit']})" for i in inputs) if inputs else ""
    return f"commit {machine.get('git_commit', '?')} ({tree}), {machine['time']}{derived}"


def _fraction(block: dict) -> str:
    return f"{block['right']}/{block['of']}"


def summary() -> str:
    check_provenance()
    recording, training, recipe, latency, impact, scoping, quality = (load(name) for name, _ in BENCHMARKS)
    lines = ["### Measured results (CPU, SmolLM2-135M-Instruct, fp32)", ""]
    for (name, _), data in zip(BENCHMARKS, (recording, training, recipe, latency, impact, scoping, quality), strict=True):
        if data and "machine" in data:
            m = data["machine"]
            lines.append(f"- `{name}`: {m['cpu_count']} CPU threads, torch {m['torch']}, CUDA: {m['cuda'] or 'none'}; "
                         f"{_made(data)}.")
    lines += ["", "| claim (Alchemist paper, vs a separate trainer) | paper | ours | conditions |",
              "| --- | --- | --- | --- |"]
    if training:
        mixes = {m["mix"]: m for m in training["mixes"]}
        cells = "; ".join(f"{m['replay_over_peft']:.2f}x ({m['mix']})" for m in training["mixes"])
        lines.append(f"| training throughput, one step | up to 1.72x | {cells} | one forward+backward of a sample whose "
                     "whole prompt is replayed from serving's record vs plain transformers + PEFT, LoRA r8 on every "
                     "layer's seven projections |")
    if recipe:
        cells = "; ".join(f"{m['separate_seconds_per_correction'] / m['ours_seconds_per_correction']:.2f}x "
                          f"({m['mix']}: {m['ours_seconds_per_correction']:.1f} vs "
                          f"{m['separate_seconds_per_correction']:.1f} s per correction)" for m in recipe["mixes"])
        lines.append(f"| training throughput, the product's recipe | up to 1.72x | {cells} | every step and check "
                     "of the default recipe (until learnt, with replay of earlier feedback and rehearsal) vs "
                     "transformers + PEFT repeating the same steps on the same items |")
    if training:
        best = mixes.get("1024:32") or training["mixes"][0]
        memory = 1 - best["peak_held_bytes_replay"] / best["peak_held_bytes_peft"]
        lines.append(f"| training memory | 47% less | {memory:.0%} less ({best['mix']}: "
                     f"{best['peak_held_bytes_peft'] / 2**20:.0f} -> {best['peak_held_bytes_replay'] / 2**20:.0f} MB) "
                     "| peak bytes autograd keeps plus records read, weights excluded |")
        fit = training["fit"]
        lines.append(f"| trainable tokens at a fixed memory budget | 2x | {fit['replay_over_peft']:.2f}x "
                     f"({fit['max_prompt_tokens_peft']:.0f} -> {fit['max_prompt_tokens_replay']:.0f} prompt tokens) "
                     f"| {fit['budget_bytes'] / 2**20:.0f} MB, target {fit['target_tokens']} tokens |")
    if impact:
        cells = "; ".join(f"{row['load']}: TPOT p90 {row['off']['tpot_ms']['p90']:.0f} -> {row['on']['tpot_ms']['p90']:.0f} ms, "
                          f"TTFT p90 {row['off']['ttft_ms']['p90']:.0f} -> {row['on']['ttft_ms']['p90']:.0f} ms"
                          for row in impact["rows"])
        lines.append(f"| serving latency impact | negligible | {cells} | client-measured, training paused -> on "
                     f"(a backlog waiting), TPOT target {impact['config']['tpot_slo_ms']:.0f} ms |")
    if recording:
        ratios = [r["all"]["input_throughput"] / r["none"]["input_throughput"] for r in recording["rounds"]]
        lines.append(f"| recording overhead (ours only) | - | prefill throughput x"
                     f"{recording['median_throughput_ratio_all_over_none']:.2f} with recording "
                     f"(median of {len(recording['rounds'])} alternating pairs; pairs "
                     f"{min(ratios):.2f}-{max(ratios):.2f}) | "
                     f"{recording['recorded_bytes_per_token'] / 1024:.0f} KiB recorded per prompt token |")
    if recipe:
        def even(row: dict) -> str:
            rate = row.get("break_even_feedback_rate")
            return "never" if rate is None else f"{rate:.1%}" if rate < 0.1 else f"{rate:.0%}"
        cells = "; ".join(f"{row['mix']}: {row['rates']['10%']['alchemist_s']:.1f} vs "
                          f"{row['rates']['10%']['separate_s']:.1f} s ({row['rates']['10%']['saving_share']:+.0%}, "
                          f"break-even {even(row)})" for row in recipe["mixes"])
        lines.append(f"| engine seconds per correction at 10% feedback (ours only) | - | {cells} | the recipe's "
                     "training plus the recording of the 10 requests each correction stands for, vs a separate "
                     "PEFT trainer on the same steps |")
    if latency:
        fresh, single, burst = latency["fresh"], latency["one_at_a_time"], latency["burst"]
        lines.append(f"| learnt when served (ours only) | - | fresh server's first correction served after "
                     f"{_seconds(fresh['median_s'])} s ({fresh['right']}/{fresh['count']} right); one at a time: median "
                     f"{_seconds(single['median_s'])} s, {single['right']}/{single['count']} right when asked at once; "
                     f"a burst of {burst['count']}: all served {_seconds(burst['all_served_after_last_s'])} s after the "
                     f"last, {burst['right']}/{burst['count']} right; reuse ratio {latency['reuse_ratio']:.2f} | "
                     "through the server, default flags, each correction on the answer it corrects |")
    if scoping:
        plain = scoping["decisions"].get("report/feedback") or next(iter(scoping["decisions"].values()))
        big = scoping["lineage_1000"]
        ttft = scoping.get("ttft")
        timing = (f"client TTFT p50 x{ttft['p50_ratio']:.3f} at light load ({ttft['words']['p50_ms']:.0f} -> "
                  f"{ttft['meaning']['p50_ms']:.0f} ms), " if ttft else "")
        lines.append(f"| the adapter scope by meaning (ours only) | - | {timing}decision p50 "
                     f"{big['decision_ms']['p50']:.1f} ms with {big['learnt_prompts']} learnt prompts; in scope: "
                     f"ShareGPT {big['sharegpt_in_scope'][0]}/{big['sharegpt_in_scope'][1]}, controls "
                     f"{big['controls_in_scope'][0]}/{big['controls_in_scope'][1]}; report split: plain paraphrases "
                     f"{plain['plain_paraphrases'][0]}/{plain['plain_paraphrases'][1]} | words rule vs words + "
                     "sentence encoder, same server otherwise |")
    if quality and "sets" not in quality:  # an earlier protocol (one set of facts): not comparable
        quality = None
    if quality:
        cells = []
        for name, entry in quality["sets"].items():
            b, a, scope = entry["before"], entry["after"], entry["scope"]
            kept = entry.get("after_continual")
            tail = (f"; after {quality['continual']['accepts']} more accepts: facts {_fraction(kept['facts'])}, "
                    f"controls {_fraction(kept['controls'])}") if kept else ""
            cells.append(f"{name}: facts {_fraction(b['facts'])} -> {_fraction(a['facts'])}, paraphrases "
                         f"{_fraction(b['paraphrases'])} -> {_fraction(a['paraphrases'])}, controls "
                         f"{_fraction(b['controls'])} -> {_fraction(a['controls'])} (scope: paraphrases "
                         f"{scope['paraphrase_recall']}, controls {scope['control_false_positives']}){tail}")
        lines.append(f"| learns from feedback (ours only) | - | {'; '.join(cells)} | one correction per fact through "
                     f"/v1/feedback, project defaults, `{quality['split']}` split (tuned on the other) |")
    missing = {name: why for name, why in NOT_RUN.items() if load(name) is None}
    if quality is None and "quality" not in missing:
        missing["quality"] = "no run of the one-correction protocol on the current code"
    for name, why in missing.items():
        lines.append(f"| `{name}` | - | not measured | {why} |")
    lines.append("")
    for title, data in (("Training throughput and memory", training), ("The recipe's cost per correction", recipe),
                        ("Learnt when served", latency), ("Serving impact", impact), ("The scope's cost", scoping),
                        ("Recording overhead", recording), ("Learning quality", quality)):
        if data:
            lines += [f"#### {title}", "", f"`{data['command']}`", "", data["markdown"], ""]
    return "\n".join(lines).rstrip() + "\n"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


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
