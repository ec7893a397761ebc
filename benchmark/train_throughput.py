"""Training throughput and memory: replay of recorded prefill vs the project's recompute vs plain PEFT.

On the same samples, in one run, one LoRA forward+backward per sample (r 8 on all seven
projections, loss on the target tokens; the optimizer step is the same for all and excluded),
three ways, alternating which goes first, median of ``--repeats``:

- **replay**: the prompt's recorded activations are replayed (``training.step``); the records
  are made by ``training.reference.record_prompt`` - the tensors the serving capture stores - and
  are not timed (serving made them already);
- **recompute** (ours): the same step with no record: every prompt row is filled by a no-grad
  forward first;
- **PEFT**: plain transformers + PEFT, ``model(prompt + target)`` and ``loss.backward()`` - the
  separate trainer a user would write instead.

Memory counts everything the step holds for the backward: autograd's saved activations
(``SavedTensorMeter``, frozen weights and adapter excluded) **plus** the records - the replay's
(which sit in the activation store: on a GPU in the host tier) and recompute's filled rows. The
largest trainable prompt at ``--budget-mb`` is found the same way, records counted. The analytic
bound of the replay's speed-up is ``2(P + T) / (P + 2T)`` (it removes the prompt's forward, not
its backward); "of bound" is the measured speed-up over recompute divided by it.

    .venv/bin/python benchmark/train_throughput.py --output benchmark/results/train_throughput.json

Runs on CPU (fp32) or, when CUDA is available, on the GPU (bf16) with the device-wide peak from
``torch.cuda.max_memory_allocated`` too. Needs no SGLang: transformers loads the same weights.
"""

from __future__ import annotations

import argparse
import copy
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

BUDGET_MB = 1024
PATHS = ("replay", "recompute", "peft")
SPEC = LoraSpec(8, 16.0, LORA_MODULES)


def load_models(model_dir: str, device: torch.device):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model = frozen_model_from_transformers(base)
    adapter = LoraAdapter(SPEC, model.geometry, device)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0.0, 0.01)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=SPEC.rank, lora_alpha=SPEC.alpha, lora_dropout=0.0,
                                                          target_modules=list(SPEC.target_modules)))
    set_peft_model_state_dict(peft, adapter.peft_state_dict())
    return model, adapter, peft


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


def timed(path: str, model, adapter, peft, prompt, target, record) -> tuple[float, int, int | None]:
    """Seconds, peak bytes held for the backward (records counted), peak CUDA bytes (or None)."""
    device = model.device
    adapter.zero_grad()
    peft.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    exclude = storages_of(model, adapter, peft)  # weights are not activations
    sync(device)
    started = time.perf_counter()
    held = 0
    with SavedTensorMeter(exclude=exclude) as meter:
        if path == "peft":
            ids = torch.tensor([prompt + target], device=device)
            logits = peft(ids).logits[0, len(prompt) - 1 : -1]
            loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, len(prompt):], reduction="sum")
            (loss / len(target)).backward()
        else:
            result = run_to_completion(sample_step(model, adapter, Example(
                prompt, target, activations=record if path == "replay" else None), 1.0 / len(target)))
            held = (record.nbytes if path == "replay" else 0) + result.peak_filled_bytes  # filled rows: target rows too
    sync(device)
    seconds = time.perf_counter() - started
    cuda_peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
    return seconds, meter.peak_bytes + held, cuda_peak


def bound(prompt: int, target: int) -> float:
    return 2 * (prompt + target) / (prompt + 2 * target)


def measure_mix(name: str, samples, model, adapter, peft, repeats: int) -> dict:
    totals = {path: 0.0 for path in PATHS}
    rows = []
    for index, (prompt, target) in enumerate(samples):
        record = record_prompt(model, adapter, prompt)
        record.move_to_host(range(model.geometry.num_layers))  # the paper's layout: records on host
        times = {path: [] for path in PATHS}
        peaks = {}
        for repeat in range(repeats):
            shift = (index + repeat) % len(PATHS)
            for path in PATHS[shift:] + PATHS[:shift]:
                seconds, held, cuda = timed(path, model, adapter, peft, prompt, target, record)
                times[path].append(seconds)
                peaks[path] = (held, cuda)
        medians = {path: statistics.median(times[path]) for path in PATHS}
        for path in PATHS:
            totals[path] += medians[path]
        rows.append({"prompt_tokens": len(prompt), "target_tokens": len(target),
                     **{f"{path}_s": medians[path] for path in PATHS},
                     **{f"held_bytes_{path}": peaks[path][0] for path in PATHS},
                     **{f"cuda_peak_bytes_{path}": peaks[path][1] for path in PATHS},
                     "record_bytes": record.nbytes})
        print(f"  {name} #{index}: {len(prompt)}:{len(target)} replay {medians['replay']:.3f}s recompute "
              f"{medians['recompute']:.3f}s peft {medians['peft']:.3f}s", flush=True)
    tokens = sum(len(p) + len(t) for p, t in samples)
    prompt_mean = statistics.mean(len(p) for p, _ in samples)
    target_mean = statistics.mean(len(t) for _, t in samples)
    over_recompute = totals["recompute"] / totals["replay"]
    return {
        "mix": name, "samples": len(samples), "tokens": tokens,
        **{f"{path}_tokens_per_s": tokens / totals[path] for path in PATHS},
        **{f"{path}_seconds_per_sample": totals[path] / len(samples) for path in PATHS},
        "replay_over_recompute": over_recompute,
        "replay_over_peft": totals["peft"] / totals["replay"],
        "recompute_over_peft": totals["peft"] / totals["recompute"],
        "analytic_bound": bound(prompt_mean, target_mean),
        "of_bound": over_recompute / bound(prompt_mean, target_mean),
        **{f"peak_held_bytes_{path}": max(r[f"held_bytes_{path}"] for r in rows) for path in PATHS},
        "mean_record_bytes": statistics.mean(r["record_bytes"] for r in rows),
        "mean_prompt_tokens": prompt_mean, "mean_target_tokens": target_mean,
        "rows": rows,
    }


def largest_fitting_prompt(model, adapter, peft, budget_bytes: int, lengths: list[int], target_len: int) -> dict:
    """Peak held bytes (records counted) at several prompt lengths, then the longest prompt under the budget."""
    vocab = model.geometry.vocab_size
    points = {path: [] for path in PATHS}
    for length in lengths:
        [(prompt, target)] = synthetic_samples(1, length, target_len, vocab, seed=length)
        record = record_prompt(model, adapter, prompt)
        record.move_to_host(range(model.geometry.num_layers))
        for path in PATHS:
            _, held, cuda = timed(path, model, adapter, peft, prompt, target, record)
            points[path].append((length, cuda if cuda is not None else held))
    result = {"budget_bytes": budget_bytes, "target_tokens": target_len, "points": points}
    for path, values in points.items():
        result[f"max_prompt_tokens_{path}"] = _solve(values, budget_bytes)
    result["replay_over_peft"] = result["max_prompt_tokens_replay"] / result["max_prompt_tokens_peft"]
    return result


def _solve(values: list[tuple[int, int]], budget: int) -> float:
    for (x0, y0), (x1, y1) in zip(values, values[1:], strict=False):
        if y0 <= budget <= y1:
            return x0 + (budget - y0) * (x1 - x0) / max(y1 - y0, 1)
    (x0, y0), (x1, y1) = values[-2], values[-1]
    slope = (y1 - y0) / max(x1 - x0, 1)
    return x1 + (budget - y1) / slope if budget > y1 else x0 * budget / max(y0, 1)


def markdown(result: dict) -> str:
    lines = ["| mix | samples | tok/s replay / recompute / PEFT | replay vs PEFT | replay vs recompute (of bound) "
             "| MB held, records counted: PEFT -> replay |", "| --- | --- | --- | --- | --- | --- |"]
    for mix in result["mixes"]:
        lines.append(
            f"| {mix['mix']} | {mix['samples']} | {mix['replay_tokens_per_s']:.0f} / {mix['recompute_tokens_per_s']:.0f}"
            f" / {mix['peft_tokens_per_s']:.0f} | {mix['replay_over_peft']:.2f}x | {mix['replay_over_recompute']:.2f}x "
            f"({mix['of_bound']:.0%} of {mix['analytic_bound']:.2f}x) | {mix['peak_held_bytes_peft'] / 2**20:.0f} -> "
            f"{mix['peak_held_bytes_replay'] / 2**20:.0f} ({1 - mix['peak_held_bytes_replay'] / mix['peak_held_bytes_peft']:.0%}"
            " less) |")
    fit = result["fit"]
    lines.append("")
    lines.append(f"Largest prompt (target {fit['target_tokens']} tokens) within {fit['budget_bytes'] / 2**20:.0f} MB, "
                 f"records counted: replay {fit['max_prompt_tokens_replay']:.0f}, recompute "
                 f"{fit['max_prompt_tokens_recompute']:.0f}, PEFT {fit['max_prompt_tokens_peft']:.0f} tokens "
                 f"(replay {fit['replay_over_peft']:.2f}x PEFT).")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = [m["mix"] for m in result["mixes"]]
    x = range(len(names))
    left.bar([i - 0.2 for i in x], [m["replay_over_peft"] for m in result["mixes"]], 0.4, label="replay / PEFT")
    left.bar([i + 0.2 for i in x], [m["replay_over_recompute"] for m in result["mixes"]], 0.4,
             label="replay / recompute")
    left.plot(list(x), [m["analytic_bound"] for m in result["mixes"]], "k_", markersize=20, label="analytic bound")
    left.set_xticks(list(x), names)
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_ylabel("training throughput ratio")
    left.legend()
    for training_path, style in (("peft", "o-"), ("recompute", "^-"), ("replay", "s-")):
        xs, ys = zip(*result["fit"]["points"][training_path], strict=True)
        right.plot(xs, [y / 2**20 for y in ys], style, label=training_path)
    right.axhline(result["fit"]["budget_bytes"] / 2**20, color="grey", linestyle="--", label="budget")
    right.set_xlabel("prompt tokens (target 32)")
    right.set_ylabel("MB held for the backward (records counted)")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    from transformers import AutoTokenizer

    from sglang_alchemist.assets import smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=str(smollm2.default_model_dir()))
    parser.add_argument("--sharegpt-samples", type=int, default=8)
    parser.add_argument("--heavy-samples", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-mb", type=float, default=BUDGET_MB)
    parser.add_argument("--fit-lengths", default="256,512,1024,2048")
    parser.add_argument("--mixes", default="ShareGPT,1024:32,512:64,256:256,108:140")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "train_throughput.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, adapter, peft = load_models(args.model_path, device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    vocab = model.geometry.vocab_size
    result = {"command": command_line(), "machine": machine(), "device": str(device),
              "dtype": str(model.dtype), "model": args.model_path, "mixes": []}
    for index, name in enumerate(args.mixes.split(",")):
        if name == "ShareGPT":
            samples = sharegpt_samples(tokenizer, args.sharegpt_samples, max_target=512)
        else:
            prompt_len, target_len = (int(x) for x in name.split(":"))
            samples = synthetic_samples(args.heavy_samples, prompt_len, target_len, vocab, seed=index)
        result["mixes"].append(measure_mix(name, samples, model, adapter, peft, args.repeats))
    lengths = [int(x) for x in args.fit_lengths.split(",")]
    result["fit"] = largest_fitting_prompt(model, adapter, peft, int(args.budget_mb * 2**20), lengths, 32)
    result["markdown"] = markdown(result)
    write_json(args.output, result)
    plot(result, args.output.with_suffix(".png"))
    print(result["markdown"])
    print(f"written: {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
