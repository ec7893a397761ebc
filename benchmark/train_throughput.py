"""Training throughput and memory: replay of recorded prefill vs recompute (the separate trainer).

On the same samples, in one run: a LoRA forward+backward per sample (``training.step``), once
replaying the prompt's recorded activations and once recomputing them (what a separate trainer
does), alternating which goes first, median of ``--repeats``. Records are made by
``training.reference.record_prompt`` - exactly the tensors the serving capture stores - and
are not timed (serving made them already). The optimizer step is identical for both paths and
is excluded.

Reported per mix (ShareGPT length mix; prompt-heavy mixes 1024:32 and 512:64):
- tokens/s (prompt + target tokens per second) and samples/s, replay / recompute ratio;
- peak bytes of activations autograd keeps for backward (``SavedTensorMeter``; the frozen
  weights and the adapter, which autograd also references, are excluded), recompute -> replay;
- recorded bytes per sample (they live in the activation store's tiers, not in training);
- the largest prompt (target 32 tokens) whose training fits a fixed budget of saved bytes.

    .venv/bin/python benchmark/train_throughput.py --output benchmark/results/train_throughput.json

Runs on CPU (fp32) or, when CUDA is available, on the GPU (bf16) with peak device memory from
``torch.cuda.max_memory_allocated`` too. Needs no SGLang: transformers loads the same weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_alchemist.training.lora import LORA_MODULES, LoraAdapter, LoraSpec  # noqa: E402
from sglang_alchemist.training.memory_meter import SavedTensorMeter, storages_of  # noqa: E402
from sglang_alchemist.training.model_spec import frozen_model_from_transformers  # noqa: E402
from sglang_alchemist.training.reference import record_prompt  # noqa: E402
from sglang_alchemist.training.step import Example, run_to_completion, sample_step  # noqa: E402

from common import RESULTS_DIR, command_line, machine, write_json  # noqa: E402

BUDGET_MB = 256


def load_model(model_dir: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model = frozen_model_from_transformers(base)
    adapter = LoraAdapter(LoraSpec(8, 16.0, LORA_MODULES), model.geometry, device)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0.0, 0.01)
    return base, model, adapter


def sharegpt_samples(tokenizer, count: int, max_target: int) -> list[tuple[list[int], list[int]]]:
    from sglang_alchemist.assets import sharegpt

    samples = []
    for pair, _, _ in sharegpt.pairs(tokenizer, limit=count, seed=1):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": pair.prompt}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
        target = tokenizer.encode(pair.response, add_special_tokens=False)[:max_target] + [tokenizer.eos_token_id]
        samples.append((list(prompt), target))
    return samples


def synthetic_samples(count: int, prompt_len: int, target_len: int, vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(100, vocab, (prompt_len,), generator=generator).tolist(),
         torch.randint(100, vocab, (target_len,), generator=generator).tolist())
        for _ in range(count)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(model, adapter, prompt, target, activations) -> tuple[float, int, int | None]:
    """Seconds, peak saved bytes, peak CUDA bytes (or None) of one sample's forward+backward."""
    device = model.device
    adapter.zero_grad()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    sync(device)
    started = time.perf_counter()
    with SavedTensorMeter(exclude=storages_of(model, adapter)) as meter:  # activations only, not weights
        run_to_completion(sample_step(model, adapter, Example(prompt, target, activations=activations),
                                      1.0 / len(target)))
    sync(device)
    seconds = time.perf_counter() - started
    cuda_peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
    return seconds, meter.peak_bytes, cuda_peak


def measure_mix(name: str, samples, model, adapter, repeats: int) -> dict:
    replay_times, recompute_times, rows = [], [], []
    for index, (prompt, target) in enumerate(samples):
        record = record_prompt(model, adapter, prompt)
        record.move_to_host(range(model.geometry.num_layers))  # the paper's layout: records on host
        per_path = {"replay": [], "recompute": []}
        peaks = {}
        for repeat in range(repeats):
            order = ("replay", "recompute") if (index + repeat) % 2 == 0 else ("recompute", "replay")
            for path in order:
                seconds, saved, cuda = timed_step(model, adapter, prompt, target,
                                                  record if path == "replay" else None)
                per_path[path].append(seconds)
                peaks[path] = (saved, cuda)
        replay_s, recompute_s = statistics.median(per_path["replay"]), statistics.median(per_path["recompute"])
        replay_times.append(replay_s)
        recompute_times.append(recompute_s)
        rows.append({
            "prompt_tokens": len(prompt), "target_tokens": len(target),
            "replay_s": replay_s, "recompute_s": recompute_s, "speedup": recompute_s / replay_s,
            "saved_bytes_replay": peaks["replay"][0], "saved_bytes_recompute": peaks["recompute"][0],
            "cuda_peak_bytes_replay": peaks["replay"][1], "cuda_peak_bytes_recompute": peaks["recompute"][1],
            "record_bytes": record.nbytes,
        })
        print(f"  {name} #{index}: {len(prompt)}:{len(target)} replay {replay_s:.3f}s "
              f"recompute {recompute_s:.3f}s x{recompute_s / replay_s:.2f}", flush=True)
    tokens = sum(len(p) + len(t) for p, t in samples)
    return {
        "mix": name, "samples": len(samples), "tokens": tokens,
        "replay_tokens_per_s": tokens / sum(replay_times),
        "recompute_tokens_per_s": tokens / sum(recompute_times),
        "throughput_ratio": sum(recompute_times) / sum(replay_times),
        "replay_samples_per_s": len(samples) / sum(replay_times),
        "recompute_samples_per_s": len(samples) / sum(recompute_times),
        "peak_saved_bytes_replay": max(r["saved_bytes_replay"] for r in rows),
        "peak_saved_bytes_recompute": max(r["saved_bytes_recompute"] for r in rows),
        "mean_record_bytes": statistics.mean(r["record_bytes"] for r in rows),
        "rows": rows,
    }


def largest_fitting_prompt(model, adapter, budget_bytes: int, lengths: list[int], target_len: int) -> dict:
    """Peak saved bytes at several prompt lengths, then the longest prompt under the budget.

    Peaks grow almost linearly with the prompt; the longest fitting length is interpolated
    (or extrapolated from the last two points) and reported with the measured points.
    """
    vocab = model.geometry.vocab_size
    points = {"replay": [], "recompute": []}
    for length in lengths:
        [(prompt, target)] = synthetic_samples(1, length, target_len, vocab, seed=length)
        record = record_prompt(model, adapter, prompt)
        record.move_to_host(range(model.geometry.num_layers))
        for path in points:
            _, saved, cuda = timed_step(model, adapter, prompt, target, record if path == "replay" else None)
            points[path].append((length, cuda if cuda is not None else saved))
    result = {"budget_bytes": budget_bytes, "target_tokens": target_len, "points": points}
    for path, values in points.items():
        result[f"max_prompt_tokens_{path}"] = _solve(values, budget_bytes)
    result["trainable_tokens_ratio"] = result["max_prompt_tokens_replay"] / result["max_prompt_tokens_recompute"]
    return result


def _solve(values: list[tuple[int, int]], budget: int) -> float:
    for (x0, y0), (x1, y1) in zip(values, values[1:], strict=False):
        if y0 <= budget <= y1:
            return x0 + (budget - y0) * (x1 - x0) / max(y1 - y0, 1)
    (x0, y0), (x1, y1) = values[-2], values[-1]
    slope = (y1 - y0) / max(x1 - x0, 1)
    return x1 + (budget - y1) / slope if budget > y1 else x0 * budget / max(y0, 1)


def markdown(result: dict) -> str:
    lines = ["| mix | samples | replay tok/s | recompute tok/s | speed-up | saved MB recompute -> replay | memory ratio |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mix in result["mixes"]:
        lines.append(
            f"| {mix['mix']} | {mix['samples']} | {mix['replay_tokens_per_s']:.0f} | {mix['recompute_tokens_per_s']:.0f} "
            f"| {mix['throughput_ratio']:.2f}x | {mix['peak_saved_bytes_recompute'] / 2**20:.0f} -> "
            f"{mix['peak_saved_bytes_replay'] / 2**20:.0f} | "
            f"{1 - mix['peak_saved_bytes_replay'] / mix['peak_saved_bytes_recompute']:.0%} less |")
    fit = result["fit"]
    lines.append("")
    lines.append(f"Largest prompt (target {fit['target_tokens']} tokens) within {fit['budget_bytes'] / 2**20:.0f} MB "
                 f"of saved activations: replay {fit['max_prompt_tokens_replay']:.0f} tokens, recompute "
                 f"{fit['max_prompt_tokens_recompute']:.0f} tokens ({fit['trainable_tokens_ratio']:.2f}x).")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [m["mix"] for m in result["mixes"]]
    left.bar(names, [m["throughput_ratio"] for m in result["mixes"]], color="tab:blue")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_ylabel("training throughput, replay / recompute")
    left.set_title("Speed-up of replay")
    for training_path, style in (("recompute", "o-"), ("replay", "s-")):
        xs, ys = zip(*result["fit"]["points"][training_path], strict=True)
        right.plot(xs, [y / 2**20 for y in ys], style, label=training_path)
    right.axhline(result["fit"]["budget_bytes"] / 2**20, color="grey", linestyle="--", label="budget")
    right.set_xlabel("prompt tokens (target 32)")
    right.set_ylabel("peak saved activations (MB)")
    right.legend()
    right.set_title("Training memory")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    from transformers import AutoTokenizer

    from sglang_alchemist.assets import smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=str(smollm2.default_model_dir()))
    parser.add_argument("--sharegpt-samples", type=int, default=12)
    parser.add_argument("--heavy-samples", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-mb", type=float, default=BUDGET_MB)
    parser.add_argument("--fit-lengths", default="128,256,512,1024,2048")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "train_throughput.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, model, adapter = load_model(args.model_path, device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    vocab = model.geometry.vocab_size
    mixes = [
        ("ShareGPT", sharegpt_samples(tokenizer, args.sharegpt_samples, max_target=512)),
        ("1024:32", synthetic_samples(args.heavy_samples, 1024, 32, vocab, seed=1)),
        ("512:64", synthetic_samples(args.heavy_samples, 512, 64, vocab, seed=2)),
    ]
    result = {"command": command_line(), "machine": machine(), "device": str(device),
              "dtype": str(model.dtype), "model": args.model_path, "mixes": []}
    for name, samples in mixes:
        result["mixes"].append(measure_mix(name, samples, model, adapter, args.repeats))
    lengths = [int(x) for x in args.fit_lengths.split(",")]
    result["fit"] = largest_fitting_prompt(model, adapter, int(args.budget_mb * 2**20), lengths, 32)
    result["markdown"] = markdown(result)
    write_json(args.output, result)
    plot(result, args.output.with_suffix(".png"))
    print(result["markdown"])
    print(f"written: {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
