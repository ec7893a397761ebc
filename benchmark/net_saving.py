"""The net result: engine seconds per trained feedback, Alchemist vs serving plus a separate trainer.

Recording costs every recorded request some prefill time; replay saves time only on the requests
that get feedback. Per trained feedback, at a feedback rate ``f`` (the share of served requests
that get feedback) and a prompt of ``P`` tokens:

    Alchemist:  replay training + (1 / f) x recording cost of one request (P x extra seconds per prompt token)
    separate:   a separate trainer's recompute step (plain transformers + PEFT), nothing while serving

Both sides come from the same suite run: the extra prefill seconds per prompt token from
``recording_overhead.json`` (``record all`` vs ``none`` throughput), the training seconds per
sample of each prompt:target mix from ``train_throughput.json``. On 2 CPU cores the prefill
difference is often inside the noise (alternating rounds vary by +-10%), so recording is never
charged less than its own copy: the time to write a prompt token's record (its bytes, from
``recording_overhead.json``) into a preallocated pool, measured here. Reported per mix: seconds per
trained feedback for both at 1%, 10% and 100% feedback rates, the saving, and the break-even rate
(below it, recording costs more than replay saves; ``--alchemist-record sample`` or ``opt-in``
then records only what is likely to get feedback).

    .venv/bin/python benchmark/net_saving.py        # after recording_overhead.py and train_throughput.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, write_json  # noqa: E402

RATES = (0.01, 0.10, 1.00)


def extra_seconds_per_prompt_token(recording: dict) -> float:
    """Median over the alternating rounds of 1/throughput(all) - 1/throughput(none)."""
    return statistics.median(1 / r["all"]["input_throughput"] - 1 / r["none"]["input_throughput"]
                             for r in recording["rounds"])


def copy_seconds_per_token(bytes_per_token: int, tokens: int = 64, rounds: int = 24) -> float:
    """The floor of recording's cost: one prompt token's record copied into a preallocated pool.

    A plain copy of the same bytes (no hooks, no bookkeeping) into a slab allocated and touched
    once, as ``memory/pool.py`` does, at offsets that do not stay in cache; median of ``rounds``.
    """
    width = bytes_per_token // 4  # float32 columns
    source = torch.randn(tokens, width)
    slots = 8
    slab = torch.zeros(slots * tokens, width)
    times = []
    for index in range(rounds):
        offset = (index % slots) * tokens
        started = time.perf_counter()
        slab[offset : offset + tokens].copy_(source)
        times.append(time.perf_counter() - started)
    return statistics.median(times) / tokens


def net(recording: dict, training: dict, copy_per_token: float = 0.0) -> dict:
    measured = extra_seconds_per_prompt_token(recording)
    per_token = max(measured, copy_per_token)
    rows = []
    for mix in training["mixes"]:
        prompt = mix["mean_prompt_tokens"]
        replay, separate = mix["replay_seconds_per_sample"], mix["peft_seconds_per_sample"]
        record_cost = per_token * prompt
        row = {"mix": mix["mix"], "prompt_tokens": prompt, "recording_seconds_per_request": record_cost,
               "replay_seconds": replay, "separate_trainer_seconds": separate, "rates": {}}
        for rate in RATES:
            alchemist = replay + record_cost / rate
            row["rates"][f"{rate:.0%}"] = {"alchemist_s": alchemist, "separate_s": separate,
                                           "saving_s": separate - alchemist, "saving_share": 1 - alchemist / separate}
        saved = separate - replay
        row["break_even_feedback_rate"] = record_cost / saved if saved > 0 else None
        rows.append(row)
    return {"extra_prefill_seconds_per_prompt_token": measured, "copy_seconds_per_prompt_token": copy_per_token,
            "charged_seconds_per_prompt_token": per_token, "mixes": rows}


def markdown(result: dict) -> str:
    measured, copy = result["extra_prefill_seconds_per_prompt_token"], result["copy_seconds_per_prompt_token"]
    cost = (f"Recording costs {measured * 1000:.3f} ms of prefill per prompt token (median of alternating rounds)."
            if measured >= copy else
            f"Recording's measured extra prefill time ({measured * 1000:.3f} ms per prompt token, median of the "
            f"alternating rounds' differences) was below the time its bytes take to copy into the pool alone; "
            f"that copy ({copy * 1000:.3f} ms per prompt token, measured in this run) is charged instead.")
    lines = [cost, "",
             "| mix | seconds per trained feedback, Alchemist / separate trainer, at 1% / 10% / 100% feedback "
             "| break-even feedback rate |", "| --- | --- | --- |"]
    for row in result["mixes"]:
        cells = " / ".join(f"{row['rates'][k]['alchemist_s']:.2f} vs {row['rates'][k]['separate_s']:.2f}"
                           for k in ("1%", "10%", "100%"))
        even = row["break_even_feedback_rate"]
        lines.append(f"| {row['mix']} | {cells} | {'never' if even is None else f'{even:.1%}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recording", type=Path, default=RESULTS_DIR / "recording_overhead.json")
    parser.add_argument("--training", type=Path, default=RESULTS_DIR / "train_throughput.json")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "net_saving.json")
    args = parser.parse_args()
    recording = json.loads(args.recording.read_text())
    copy = copy_seconds_per_token(int(recording["recorded_bytes_per_token"]))
    result = net(recording, json.loads(args.training.read_text()), copy)
    result["command"] = command_line()
    result["inputs"] = {"recording": str(args.recording.name), "training": str(args.training.name)}
    result["markdown"] = markdown(result)
    write_json(args.output, result)
    print(result["markdown"])
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
