"""Engine seconds per correction with the product's recipe: this trainer vs a separate transformers + PEFT trainer.

What a correction costs is not one forward and backward: the default recipe trains an update of
several optimizer steps, each over the correction, earlier feedback (experience replay) and guard
rehearsal prompts, with a forward-only check after each step, until the model gives the
correction (``training/recipe.py``). This benchmark runs that recipe for a stream of corrections
arriving one at a time, twice on the same items and the same steps:

- **ours**: ``LearningCore`` with the project's defaults, each correction carrying the record
  serving made of its prompt (``training.reference.record_prompt``: the tensors the capture stores;
  made by the base model, which answers a new subject under the adapter's scope). Rows come from
  the frozen trunk's records and serving's record where they are exact; the rest is computed.
- **separate trainer**: transformers + PEFT (the same LoRA rank, targets and layers, AdamW, the
  same clipping and output anchor), replaying exactly the steps ours took - every item, every loss
  scale, every check - with ``model(prompt + target)`` forward and ``loss.backward()``.

The two alternate correction by correction in one process (``--threads`` intra-op threads), so a
slow minute of the machine hits both. Ours is then charged the recording of every served request:
at a feedback rate ``f`` a correction stands for ``1 / f`` recorded requests of the mix's prompt
length, each costing the larger of ``recording_overhead.json``'s measured extra prefill time per
prompt token and the time the record's bytes take to copy into a preallocated slab (measured here). Reported per mix: training seconds per correction both ways, the
engine seconds per correction at 1%, 10% and 100% feedback, and the break-even feedback rate.

    .venv/bin/python benchmark/recipe_cost.py --output benchmark/results/recipe_cost.json

Mixes: ``sharegpt`` (a ShareGPT prompt, its answer's first 48 tokens as the correction) and
``long`` (a 1024-token prompt - ShareGPT text - with a 32-token correction).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, machine, provenance, write_json  # noqa: E402
from learning_sweep import Harness  # noqa: E402

RATES = (0.01, 0.10, 1.00)


def extra_seconds_per_prompt_token(recording: dict) -> float:
    """Median over ``recording_overhead``'s alternating rounds of 1/throughput(all) - 1/throughput(none)."""
    return statistics.median(1 / r["all"]["input_throughput"] - 1 / r["none"]["input_throughput"]
                             for r in recording["rounds"])


def copy_seconds_per_token(bytes_per_token: int, tokens: int = 64, rounds: int = 24) -> float:
    """The floor of recording's cost: one prompt token's record copied into a preallocated slab.

    A plain copy of the same bytes (no hooks, no bookkeeping) into a slab allocated and touched
    once, as ``memory/pool.py`` does, at offsets that do not stay in cache; median of ``rounds``.
    On 2 CPU cores recording's measured extra prefill time is often inside the noise, so it is
    never charged less than this.
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
MIXES = {"sharegpt": {"prompt_tokens": None, "target_tokens": 48}, "long": {"prompt_tokens": 1024, "target_tokens": 32}}


def corrections(harness: Harness, mix: str, count: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """``count`` (prompt ids in the chat template, target ids ending with the end of turn)."""
    from sglang_alchemist.assets import sharegpt

    spec = MIXES[mix]
    pairs = sharegpt.pairs(harness.tokenizer, limit=400, seed=seed, max_prompt_tokens=1024)
    result = []
    if spec["prompt_tokens"] is None:
        for pair, _, _ in pairs[:count]:
            prompt = harness.chat_ids([{"role": "user", "content": pair.prompt}])
            target = harness.encode(pair.response, eos=False)[: spec["target_tokens"] - 1]
            result.append((prompt, target + [harness.tokenizer.eos_token_id]))
        return result
    # long prompts: ShareGPT text joined until the chat prompt reaches the mix's length
    text = " ".join(pair.prompt + " " + pair.response for pair, _, _ in pairs)
    words = text.split()
    for index in range(count):
        chunk = words[index * 2000 : (index + 1) * 2000]
        prompt = harness.chat_ids([{"role": "user", "content": " ".join(chunk)}])[-spec["prompt_tokens"]:]
        answer = harness.encode(" ".join(words[-(index + 1) * 40 : len(words) - index * 40]), eos=False)
        result.append((prompt, answer[: spec["target_tokens"] - 1] + [harness.tokenizer.eos_token_id]))
    return result


class StepLog:
    """What ours trained, step by step and check by check, for the separate trainer to repeat."""

    def __init__(self, trainer) -> None:
        self.entries: list[tuple[str, list, list[float]]] = []
        self._step, self._check = trainer.step, trainer.check
        trainer.step = self._logged_step
        trainer.check = self._logged_check

    def _logged_step(self, items, scales, planner=None, sync_weight: float = 1.0):
        self.entries.append(("step", list(items), list(scales)))
        return (yield from self._step(items, scales, planner, sync_weight=sync_weight))

    def _logged_check(self, items, planner=None):
        self.entries.append(("check", list(items), [0.0] * len(items)))
        return (yield from self._check(items, planner))

    def take(self) -> list[tuple[str, list, list[float]]]:
        entries, self.entries = self.entries, []
        return entries


class _AdapterView:
    """PEFT's LoRA parameters in the layout ``preserve.OutputAnchor.penalty`` reads (``params[layer][module]``)."""

    def __init__(self, peft, num_layers: int, scale: float) -> None:
        from sglang_alchemist.training.lora import ATTENTION_MODULES

        self.params = [{} for _ in range(num_layers)]
        for name, param in peft.named_parameters():
            if "lora_A" not in name:
                continue
            layer = int(name.split(".layers.")[1].split(".")[0])
            module = name.split(".lora_A")[0].rsplit(".", 1)[1]
            b = dict(peft.named_parameters())[name.replace("lora_A", "lora_B")]
            assert (module in ATTENTION_MODULES) == (".self_attn." in name)
            self.params[layer][module] = (param, b)
        self.spec = type("Spec", (), {"scale": scale})()


class SeparateTrainer:
    """transformers + PEFT running the steps ours took (same LoRA, optimizer, clipping, anchor)."""

    def __init__(self, harness: Harness, core) -> None:
        from peft import LoraConfig, get_peft_model

        adapter = core.trainer.adapter
        config = adapter.peft_config()
        lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"],
                          lora_dropout=0.0, layers_to_transform=config.get("layers_to_transform"))
        self.model = get_peft_model(copy.deepcopy(harness.hf), lora)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        settings = core.trainer.settings
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.clip = settings.grad_clip
        self.anchor = core.trainer.anchor
        self.view = _AdapterView(self.model, harness.model.geometry.num_layers, adapter.spec.scale)

    def run(self, entries) -> float:
        from sglang_alchemist.training.objectives import objective_loss

        started = time.perf_counter()
        for kind, items, scales in entries:
            if kind == "check":
                with torch.no_grad():
                    for item in items:
                        self.model(torch.tensor([item.prompt_ids + item.target_ids]))
                continue
            for item, scale in zip(items, scales, strict=True):
                prompt, target = item.prompt_ids, item.target_ids
                logits = self.model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
                loss = objective_loss(item.objective, logits, torch.tensor(target), item.teacher)
                (loss * item.weight * scale).backward()
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            if self.anchor is not None:
                self.anchor.penalty(self.view).backward()
                if self.clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def run_mix(harness: Harness, mix: str, count: int, seed: int) -> dict:
    from sglang_alchemist.config import AlchemistConfig
    from sglang_alchemist.training.guard import GuardSet
    from sglang_alchemist.training.lane_core import LearningCore
    from sglang_alchemist.training.learner_cache import guard_cache_path, model_fingerprint
    from sglang_alchemist.training.reference import ReferenceSample, record_prompt
    from sglang_alchemist.training.step import run_to_completion
    from sglang_alchemist.training.trainer import TrainingItem

    config = AlchemistConfig(state_dir=tempfile.mkdtemp())
    guard = GuardSet(harness.chat_ids, lambda t: harness.encode(t, eos=False), harness.tokenizer.decode,
                     special_tokens=harness.tokenizer.all_special_tokens)
    fingerprint = model_fingerprint(harness.model_path, "float32", harness.model.geometry.num_layers)
    core = LearningCore(harness.model, config, guard, harness.stop_ids, Path(config.state_dir), 8192,
                        guard_cache=guard_cache_path(fingerprint, guard, Path(config.state_dir)))
    run_to_completion(core.prepare())  # one-off, both sides need it (excluded)
    log = StepLog(core.trainer)
    separate = SeparateTrainer(harness, core)
    rows = []
    for index, (prompt, target) in enumerate(corrections(harness, mix, count, seed)):
        record = record_prompt(harness.model, None, prompt)  # serving's record (the base answered it)
        item = TrainingItem(f"{mix}-{index}", prompt, target, sample=ReferenceSample(prompt, 0, record))
        reuse_before = (core.trainer.counters.layer_rows, core.trainer.counters.layer_rows_reused)
        started = time.perf_counter()
        outcome = run_to_completion(core.update([item]))
        ours = time.perf_counter() - started
        entries = log.take()
        theirs = separate.run(entries)
        needed = core.trainer.counters.layer_rows - reuse_before[0]
        reused = core.trainer.counters.layer_rows_reused - reuse_before[1]
        rows.append({"prompt_tokens": len(prompt), "target_tokens": len(target), "steps": outcome.passes,
                     "learnt": outcome.learnt[0], "checks": sum(1 for kind, _, _ in entries if kind == "check"),
                     "items_trained": sum(len(items) for kind, items, _ in entries if kind == "step"),
                     "ours_s": ours, "separate_s": theirs, "reuse_ratio": reused / needed if needed else 0.0})
        print(f"  {mix} {index + 1}/{count}: P={len(prompt)} T={len(target)} steps {outcome.passes} "
              f"learnt {outcome.learnt[0]} ours {ours:.1f}s separate {theirs:.1f}s ({theirs / ours:.2f}x) "
              f"reuse {rows[-1]['reuse_ratio']:.2f}", flush=True)
    return {"mix": mix, "corrections": rows,
            "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rows),
            "ours_seconds_per_correction": statistics.mean(r["ours_s"] for r in rows),
            "separate_seconds_per_correction": statistics.mean(r["separate_s"] for r in rows),
            "steps_per_correction": statistics.mean(r["steps"] for r in rows),
            "reuse_ratio": core.trainer.status()["reuse_ratio"]}


def charge(result: dict, recording: dict | None, copy_per_token: float) -> dict:
    measured = extra_seconds_per_prompt_token(recording) if recording is not None else 0.0
    per_token = max(measured, copy_per_token)
    for mix in result["mixes"]:
        record_cost = per_token * mix["mean_prompt_tokens"]
        ours, separate = mix["ours_seconds_per_correction"], mix["separate_seconds_per_correction"]
        mix["recording_seconds_per_request"] = record_cost
        mix["rates"] = {f"{rate:.0%}": {"alchemist_s": ours + record_cost / rate, "separate_s": separate,
                                        "saving_share": 1 - (ours + record_cost / rate) / separate}
                        for rate in RATES}
        saved = separate - ours
        mix["break_even_feedback_rate"] = record_cost / saved if saved > 0 else None
    result["extra_prefill_seconds_per_prompt_token"] = measured
    result["copy_seconds_per_prompt_token"] = copy_per_token
    result["charged_seconds_per_prompt_token"] = per_token
    return result


def markdown(result: dict) -> str:
    lines = ["| mix | corrections | steps per correction | training s per correction, ours / separate | "
             "engine s per correction at 1% / 10% / 100% feedback, ours vs separate | break-even | reuse ratio |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mix in result["mixes"]:
        cells = " / ".join(f"{mix['rates'][k]['alchemist_s']:.1f} vs {mix['rates'][k]['separate_s']:.1f}"
                           for k in ("1%", "10%", "100%"))
        even = mix["break_even_feedback_rate"]
        lines.append(f"| {mix['mix']} (prompt {mix['mean_prompt_tokens']:.0f} tokens) | {len(mix['corrections'])} | "
                     f"{mix['steps_per_correction']:.1f} | {mix['ours_seconds_per_correction']:.1f} / "
                     f"{mix['separate_seconds_per_correction']:.1f} "
                     f"({mix['separate_seconds_per_correction'] / mix['ours_seconds_per_correction']:.2f}x) | {cells} | "
                     f"{'never' if even is None else f'{even:.1%}'} | {mix['reuse_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    from sglang_alchemist.assets import smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=str(smollm2.default_model_dir()))
    parser.add_argument("--mix", action="append", choices=tuple(MIXES), default=None)
    parser.add_argument("--corrections", type=int, default=6, help="per mix")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--recording", type=Path, default=RESULTS_DIR / "recording_overhead.json")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "recipe_cost.json")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    harness = Harness(args.model_path)
    recording = json.loads(args.recording.read_text()) if args.recording.exists() else None
    result = {"mixes": [run_mix(harness, mix, args.corrections, args.seed) for mix in args.mix or list(MIXES)]}
    # without a recording_overhead.json: SmolLM2 fp32, 10 adapted layers x 23,040 B + 20 trunk layers x 1,536 B
    bytes_per_token = int(recording["recorded_bytes_per_token"]) if recording else 261120
    charge(result, recording, copy_seconds_per_token(bytes_per_token))
    result["command"] = command_line()
    result["machine"] = machine()
    result["provenance"] = provenance([args.recording] if recording else [])
    result["markdown"] = markdown(result)
    write_json(args.output, result)
    print(result["markdown"])
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
