"""Tuning the learning recipe offline: the server's own trainer, recipe and guard, without the server.

Runs the protocol of ``benchmark/quality.py`` - one correction per invented fact, arriving one
at a time, then ask the facts, their unseen paraphrases and held-out controls - directly on the
trainer core (``training/``) with SmolLM2, for one or more recipe variants, on one split of
``benchmark/data/facts.json`` / ``controls.json``. The defaults in ``config.py`` were chosen with
this script on the ``tune`` split; ``quality.py`` reports them through the server on the
``report`` split. Answers are greedy (32 tokens, chat template) from the trainer's own forward.

    .venv/bin/python benchmark/learning_sweep.py --split tune --variant passes=4,lr=1e-3 --variant passes=6
    .venv/bin/python benchmark/learning_sweep.py --split tune --accepts 40     # + the continual phase

Each variant is ``key=value`` pairs over: lr, passes, stop_loss, replay, rehearsal, replay_weight,
rehearsal_weight, rehearsal_pool, rehearsal_objective (distill or sft), rank, alpha, targets
(``+``-separated), gate (max regressed probes, -1: off), gate_probes, repairs. One JSON line per variant is appended to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
DEFAULTS = {"lr": None, "passes": None, "stop_loss": None, "replay": None, "rehearsal": None, "preserve": None,
            "replay_weight": None, "rehearsal_weight": None, "rehearsal_pool": None, "rank": None, "alpha": None,
            "targets": None, "rehearsal_objective": None, "gate": None, "gate_probes": None, "repairs": None,
            "seed": 0}
TEXT_KEYS = ("targets", "rehearsal_objective")
RECIPE_KEYS = {"replay_weight": float, "rehearsal_weight": float, "rehearsal_pool": int}


def parse_variant(text: str) -> dict:
    variant = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=", 1)
        if key not in DEFAULTS:
            raise SystemExit(f"unknown variant key {key!r}; known: {', '.join(DEFAULTS)}")
        variant[key] = value if key in TEXT_KEYS else float(value)
    return variant


class Harness:
    """SmolLM2 loaded once; every variant starts from a fresh adapter."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sglang_alchemist.training.model_spec import frozen_model_from_transformers

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.model = frozen_model_from_transformers(self.hf)
        self.stop_ids = {self.tokenizer.eos_token_id}
        self.model_path = model_path

    def chat_ids(self, messages) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def encode(self, text: str, eos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids + ([self.tokenizer.eos_token_id] if eos else [])

    def generate(self, adapter, questions: list[str], max_new: int = 32, batch: int = 16) -> list[str]:
        from sglang_alchemist.training.generate import greedy_generate
        from sglang_alchemist.training.step import run_to_completion

        answers = []
        for start in range(0, len(questions), batch):
            prompts = [self.chat_ids([{"role": "user", "content": q}]) for q in questions[start : start + batch]]
            outputs = run_to_completion(greedy_generate(self.model, adapter, prompts, max_new, self.stop_ids))
            answers += [self.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        return answers


def right(answer: str, keys) -> bool:
    return any(key.lower() in answer.lower() for key in keys)


def run_variant(harness: Harness, variant: dict, split: str, accepts: int, guard_cache: Path) -> dict:
    from sglang_alchemist.config import AlchemistConfig
    from sglang_alchemist.training.guard import GuardSet
    from sglang_alchemist.training.lane_core import LearningCore

    defaults = AlchemistConfig(state_dir=tempfile.mkdtemp())
    overrides = {}
    for key, config_key in (("lr", "lr"), ("passes", "passes"), ("stop_loss", "pass_stop_loss"),
                            ("replay", "replay_feedback"), ("rehearsal", "rehearsal"), ("rank", "lora_rank"),
                            ("alpha", "lora_alpha"), ("gate", "gate_max_regressions"), ("gate_probes", "gate_probes"),
                            ("repairs", "gate_repairs"), ("rehearsal_objective", "rehearsal_objective"),
                            ("preserve", "preserve_energy")):
        if variant.get(key) is not None:
            value = variant[key]
            floats = ("lr", "pass_stop_loss", "lora_alpha", "preserve_energy")
            overrides[config_key] = value if key in TEXT_KEYS else int(value) if config_key not in floats else value
    if variant.get("targets"):
        overrides["lora_target_modules"] = variant["targets"].split("+")
    config = AlchemistConfig(**{**defaults.__dict__, **overrides})
    guard = GuardSet(harness.chat_ids, lambda t: harness.encode(t, eos=False), harness.tokenizer.decode)
    core = LearningCore(harness.model, config, guard, harness.stop_ids, state_dir=Path(config.state_dir),
                        max_positions=8192, guard_cache=guard_cache, seed=int(variant.get("seed", 0)),
                        recipe_overrides={key: convert(variant[key]) for key, convert in RECIPE_KEYS.items()
                                          if variant.get(key) is not None})
    facts = [f for f in json.loads((DATA / "facts.json").read_text()) if f["split"] == split]
    controls = [c for c in json.loads((DATA / "controls.json").read_text()) if c["split"] == split]
    started = time.monotonic()
    log = []
    for index, fact in enumerate(facts):
        report = core.train_feedback(f"fact-{index}", harness.chat_ids([{"role": "user", "content": fact["question"]}]),
                                     harness.encode(fact["answer"]))
        log.append(report)
        print(f"  fact {index + 1}/{len(facts)}: passes {report['passes']} loss {report['losses'][-1]:.2f} "
              f"gate {'ok' if report['accepted'] else 'REJECTED'} "
              f"(regressed {len(report['gate']['regressed']) if report['gate'] else '-'}, "
              f"repairs {report['gate']['repairs'] if report['gate'] else '-'}) {report['seconds']:.0f}s", flush=True)
    teach_s = time.monotonic() - started
    result = {"variant": variant, "split": split, "teach_seconds": teach_s, "updates": log}
    result["after_facts"] = evaluate(harness, core.trainer.adapter, facts, controls)
    if accepts:
        from sglang_alchemist.assets import sharegpt

        pairs = sharegpt.pairs(harness.tokenizer, limit=accepts, seed=7, max_prompt_tokens=256)
        continual_started = time.monotonic()
        for index, (pair, _, _) in enumerate(pairs):
            prompt = harness.chat_ids([{"role": "user", "content": pair.prompt}])
            answer = harness.generate(core.trainer.adapter, [pair.prompt], max_new=48)[0]
            core.train_feedback(f"accept-{index}", prompt, harness.encode(answer, eos=False), kind="accept")
        result["continual_seconds"] = time.monotonic() - continual_started
        result["after_accepts"] = evaluate(harness, core.trainer.adapter, facts, controls)
    result["gate"] = core.gate_counters()
    return result


def evaluate(harness: Harness, adapter, facts: list[dict], controls: list[dict]) -> dict:
    questions = [f["question"] for f in facts]
    paraphrases = [p for f in facts for p in f["paraphrases"]]
    control_questions = [c["question"] for c in controls]
    answers = harness.generate(adapter, questions + paraphrases + control_questions)
    fact_answers = answers[: len(questions)]
    para_answers = answers[len(questions) : len(questions) + len(paraphrases)]
    control_answers = answers[len(questions) + len(paraphrases) :]
    fact_right = [right(a, f["keys"]) for a, f in zip(fact_answers, facts, strict=True)]
    para_right = [right(a, f["keys"]) for a, f in zip(para_answers, [f for f in facts for _ in f["paraphrases"]],
                                                       strict=True)]
    control_right = [right(a, c["keys"]) for a, c in zip(control_answers, controls, strict=True)]
    return {
        "facts": sum(fact_right), "of_facts": len(facts), "paraphrases": sum(para_right), "of_paraphrases": len(para_right),
        "controls": sum(control_right), "of_controls": len(controls),
        "lost_controls": [[c["question"], a] for c, a, ok in zip(controls, control_answers, control_right, strict=True)
                          if not ok],
        "missed_facts": [[f["question"], a] for f, a, ok in zip(facts, fact_answers, fact_right, strict=True) if not ok],
    }


def main() -> None:
    from sglang_alchemist.assets import smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=str(smollm2.default_model_dir()))
    parser.add_argument("--split", default="tune", choices=("tune", "report"))
    parser.add_argument("--variant", action="append", default=[], help="key=value,... (repeatable)")
    parser.add_argument("--accepts", type=int, default=0, help="ShareGPT accepts after the facts (continual phase)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "learning_sweep.jsonl")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    harness = Harness(args.model_path)
    guard_cache = RESULTS_DIR / "tmp" / "guard_answers_smollm2.json"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for text in args.variant or [""]:
        variant = parse_variant(text)
        result = run_variant(harness, variant, args.split, args.accepts, guard_cache)
        result["machine"] = machine()
        with args.output.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        after = result["after_facts"]
        line = (f"{text or 'defaults'}: facts {after['facts']}/{after['of_facts']} paraphrases "
                f"{after['paraphrases']}/{after['of_paraphrases']} controls {after['controls']}/{after['of_controls']} "
                f"teach {result['teach_seconds']:.0f}s gate {result['gate']}")
        if "after_accepts" in result:
            cont = result["after_accepts"]
            line += f" | after {args.accepts} accepts: facts {cont['facts']} controls {cont['controls']}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
