"""How wrong is a replay from records made k optimizer steps ago? (the later passes of one update)

For a few invented facts (SmolLM2, one correction each), the prompt is recorded once with the
starting weights, as serving records it. The update then takes AdamW steps on the fact; before
each step after the first, the LoRA gradient is computed twice: exactly (the prompt recomputed
with the current weights) and by replaying the k-steps-old record. Printed: mean relative error
``|g_stale - g_exact| / |g_exact|`` and mean cosine, per k. docs/NOTES.md ("Later passes")
reports the result and the decision it led to (later passes recompute).

    .venv/bin/python benchmark/stale_replay.py --lr 3e-4 --facts 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_sweep  # noqa: E402


def main() -> None:
    from sglang_alchemist.assets import smollm2
    from sglang_alchemist.training.lora import LORA_MODULES, LoraAdapter, LoraSpec
    from sglang_alchemist.training.reference import record_prompt
    from sglang_alchemist.training.step import Example, run_to_completion, sample_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    harness = learning_sweep.Harness(str(smollm2.default_model_dir()))
    model = harness.model
    facts = json.loads((learning_sweep.DATA / "facts.json").read_text())[: args.facts]
    errors: dict[int, list[float]] = {k: [] for k in range(1, args.steps)}
    cosines: dict[int, list[float]] = {k: [] for k in range(1, args.steps)}
    for fact in facts:
        adapter = LoraAdapter(LoraSpec(8, 16, LORA_MODULES), model.geometry, seed=0)
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr)
        prompt = harness.chat_ids([{"role": "user", "content": fact["question"]}])
        target = harness.encode(fact["answer"])
        record = record_prompt(model, adapter, prompt)  # what serving recorded before the first step
        for step in range(args.steps):
            adapter.zero_grad()
            run_to_completion(sample_step(model, adapter, Example(prompt, target), 1.0 / len(target)))
            exact = torch.cat([g.flatten() for g in adapter.peft_grad_dict().values()])
            if step > 0:
                adapter.zero_grad()
                run_to_completion(sample_step(model, adapter, Example(prompt, target, activations=record),
                                              1.0 / len(target)))
                stale = torch.cat([g.flatten() for g in adapter.peft_grad_dict().values()])
                errors[step].append(((stale - exact).norm() / exact.norm()).item())
                cosines[step].append(torch.nn.functional.cosine_similarity(stale, exact, dim=0).item())
                adapter.zero_grad()  # the step itself uses the exact gradient
                run_to_completion(sample_step(model, adapter, Example(prompt, target), 1.0 / len(target)))
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            optimizer.step()
    for k in errors:
        print(f"lr {args.lr:g}, record {k} step(s) old: relative error {sum(errors[k]) / len(errors[k]):.3f}, "
              f"cosine {sum(cosines[k]) / len(cosines[k]):.3f}")


if __name__ == "__main__":
    main()
