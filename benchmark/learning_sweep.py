"""Tuning the learning recipe offline: the server's own trainer, recipe and guard, without the server.

Runs the protocol of ``benchmark/quality.py`` - one correction per invented fact, arriving one
at a time, then ask the facts, their unseen paraphrases and held-out controls - directly on the
trainer core (``training/``) with SmolLM2, for one or more recipe variants, on one split of
``benchmark/data/facts.json`` / ``controls.json``. The defaults in ``config.py`` were chosen with
this script on the ``tune`` split; ``quality.py`` reports them through the server on the
``report`` split. Answers are greedy (32 tokens, chat template) from the trainer's own forward.

    .venv/bin/python benchmark/learning_sweep.py --split tune --variant passes=4,lr=1e-3 --variant passes=6
    .venv/bin/python benchmark/learning_sweep.py --split tune --accepts 40     # + the continual phase

Each variant is ``key=value`` pairs over: lr, passes (the most steps per update), order (replay's
draw: forgotten or random), margin (the
learnt check's logit margin; ``inf``: every update runs all its steps), layers (``--alchemist-lora-layers``:
all, auto or a count), anchor (``--alchemist-anchor-weight``), replay, rehearsal, replay_weight,
rehearsal_weight, rehearsal_pool, rehearsal_objective (distill or sft), rank, alpha, targets
(``+``-separated), gate (max regressed probes, -1: off), gate_probes, repairs. One JSON line per
variant is appended to ``--output``.

What is reported per variant: *immediate* recall (each fact's question asked right after its own
update, as the user who corrected it would), then facts, paraphrases and controls after all
corrections, answered the way the server answers them - with the adapter inside its scope
(``feedback/scope.py``), the base model outside - plus the controls with the adapter forced on;
the steps, the learnt share and the training seconds per correction.
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
DEFAULTS = {"lr": None, "passes": None, "margin": None, "layers": None, "anchor": None, "replay": None,
            "rehearsal": None, "preserve": None, "replay_weight": None, "rehearsal_weight": None,
            "rehearsal_pool": None, "rank": None, "alpha": None, "targets": None, "rehearsal_objective": None,
            "gate": None, "gate_probes": None, "repairs": None, "order": None, "seed": 0}
TEXT_KEYS = ("targets", "rehearsal_objective", "layers", "order")
RECIPE_KEYS = {"replay_weight": float, "rehearsal_weight": float, "rehearsal_pool": int, "margin": float, "order": str}
RECIPE_NAMES = {"margin": "learnt_margin", "order": "replay_order"}


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

    def generate(self, adapter, questions: list[str], max_new: int = 32, batch: int = 16, scope=None) -> list[str]:
        """Greedy answers; with ``scope`` (a ``feedback.scope.Scope``), the adapter answers only the
        questions it covers and the base model the rest, as the server does."""
        if scope is not None:
            covered = [scope.covers(self.tokenizer.decode(self.chat_ids([{"role": "user", "content": q}])))
                       for q in questions]
            inside = iter(self.generate(adapter, [q for q, c in zip(questions, covered, strict=True) if c], max_new))
            outside = iter(self.generate(None, [q for q, c in zip(questions, covered, strict=True) if not c], max_new))
            return [next(inside) if c else next(outside) for c in covered]
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


def run_variant(harness: Harness, variant: dict, split: str, accepts: int, guard_cache: Path | None,
                data_set: str = "invented", batch: int = 1) -> dict:
    from sglang_alchemist.config import AlchemistConfig
    from sglang_alchemist.training.guard import GuardSet
    from sglang_alchemist.training.lane_core import LearningCore

    defaults = AlchemistConfig(state_dir=tempfile.mkdtemp())
    overrides = {}
    for key, config_key in (("lr", "lr"), ("passes", "passes"), ("layers", "lora_layers"),
                            ("anchor", "anchor_weight"),
                            ("replay", "replay_feedback"), ("rehearsal", "rehearsal"), ("rank", "lora_rank"),
                            ("alpha", "lora_alpha"), ("gate", "gate_max_regressions"), ("gate_probes", "gate_probes"),
                            ("repairs", "gate_repairs"), ("rehearsal_objective", "rehearsal_objective"),
                            ("preserve", "preserve_energy")):
        if variant.get(key) is not None:
            value = variant[key]
            floats = ("lr", "lora_alpha", "preserve_energy", "anchor_weight")
            overrides[config_key] = value if key in TEXT_KEYS else int(value) if config_key not in floats else value
    if variant.get("targets"):
        overrides["lora_target_modules"] = variant["targets"].split("+")
    config = AlchemistConfig(**{**defaults.__dict__, **overrides})
    guard = GuardSet(harness.chat_ids, lambda t: harness.encode(t, eos=False), harness.tokenizer.decode,
                     special_tokens=harness.tokenizer.all_special_tokens)
    if guard_cache is None:  # the machine-wide cache scripts/setup.sh fills, as the server uses it
        from sglang_alchemist.training.learner_cache import guard_cache_path, model_fingerprint

        fingerprint = model_fingerprint(harness.model_path, "float32", harness.model.geometry.num_layers)
        guard_cache = guard_cache_path(fingerprint, guard, Path(config.state_dir))
    core = LearningCore(harness.model, config, guard, harness.stop_ids, state_dir=Path(config.state_dir),
                        max_positions=8192, guard_cache=guard_cache, seed=int(variant.get("seed", 0)),
                        recipe_overrides={RECIPE_NAMES.get(key, key): convert(variant[key])
                                          for key, convert in RECIPE_KEYS.items() if variant.get(key) is not None})
    from sglang_alchemist.training.step import run_to_completion

    run_to_completion(core.prepare())  # the guard's answers, the anchor, the trunk's records: ready ahead
    from sglang_alchemist.training.trainer import TrainingItem

    from quality import load_split

    facts, controls = load_split(split, data_set=data_set)
    started = time.monotonic()
    log = []
    immediate = 0
    for first in range(0, len(facts), batch):
        group = facts[first : first + batch]
        items = [TrainingItem(f"fact-{first + i}", harness.chat_ids([{"role": "user", "content": fact["question"]}]),
                              harness.encode(fact["answer"])) for i, fact in enumerate(group)]
        report = run_to_completion(core.update(items)).public()
        answers = harness.generate(core.trainer.adapter, [fact["question"] for fact in group], scope=core.scope)
        for index, (fact, answer) in enumerate(zip(group, answers, strict=True)):
            entry = {**report, "immediate": right(answer, fact["keys"]), "learnt": [report["learnt"][index]]}
            immediate += entry["immediate"]
            log.append(entry)
            print(f"  fact {first + index + 1}/{len(facts)}: steps {report['steps']} learnt {report['learnt'][index]} "
                  f"loss {report['losses'][-1]:.2f} gate {'ok' if report['accepted'] else 'REJECTED'} "
                  f"{report['busy_seconds']:.1f}s right {entry['immediate']}: {answer[:60]!r}", flush=True)
    teach_s = time.monotonic() - started
    # per correction: an update's busy time and steps are shared by its batch
    for entry in log:
        entry["busy_seconds"] /= batch
    result = {"variant": variant, "split": split, "teach_seconds": teach_s, "updates": log,
              "immediate": immediate, "first_adapted_layer": core.trainer.adapter.first_layer,
              "steps_per_correction": sum(r["steps"] for r in log) / len(log) / batch,
              "learnt": sum(1 for r in log if r["learnt"][0]),
              "seconds_per_correction": sum(r["busy_seconds"] for r in log) / len(log),
              "reuse_ratio": core.trainer.status()["reuse_ratio"]}
    result["after_facts"] = evaluate(harness, core.trainer.adapter, facts, controls, scope=core.scope)
    if accepts:
        from sglang_alchemist.assets import sharegpt

        pairs = sharegpt.pairs(harness.tokenizer, limit=accepts, seed=7, max_prompt_tokens=256)
        continual_started = time.monotonic()
        for index, (pair, _, _) in enumerate(pairs):
            prompt = harness.chat_ids([{"role": "user", "content": pair.prompt}])
            answer = harness.generate(core.trainer.adapter, [pair.prompt], max_new=48)[0]
            core.train_feedback(f"accept-{index}", prompt, harness.encode(answer, eos=False), kind="accept")
        result["continual_seconds"] = time.monotonic() - continual_started
        result["after_accepts"] = evaluate(harness, core.trainer.adapter, facts, controls, scope=core.scope)
    result["gate"] = core.gate_counters()
    return result


def evaluate(harness: Harness, adapter, facts: list[dict], controls: list[dict], scope=None) -> dict:
    questions = [f["question"] for f in facts]
    paraphrases = [p for f in facts for p in f["paraphrases"]]
    control_questions = [c["question"] for c in controls]
    answers = harness.generate(adapter, questions + paraphrases + control_questions, scope=scope)
    forced = harness.generate(adapter, control_questions) if scope is not None else answers[-len(controls):]
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
        "controls_adapter_forced": sum(right(a, c["keys"]) for a, c in zip(forced, controls, strict=True)),
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
    parser.add_argument("--data", default="invented", choices=("invented", "plain"),
                        help="facts.json/controls.json, or plain_english.json")
    parser.add_argument("--batch", type=int, default=1, help="corrections per update (a burst arriving together)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "learning_sweep.jsonl")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    harness = Harness(args.model_path)
    guard_cache = None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for text in args.variant or [""]:
        variant = parse_variant(text)
        result = run_variant(harness, variant, args.split, args.accepts, guard_cache, args.data, args.batch)
        result["data"], result["batch"] = args.data, args.batch
        result["machine"] = machine()
        with args.output.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        after = result["after_facts"]
        line = (f"{text or 'defaults'}: immediate {result['immediate']}/{after['of_facts']} facts "
                f"{after['facts']}/{after['of_facts']} paraphrases {after['paraphrases']}/{after['of_paraphrases']} "
                f"controls {after['controls']}/{after['of_controls']} (adapter forced "
                f"{after['controls_adapter_forced']}) steps {result['steps_per_correction']:.1f} "
                f"learnt {result['learnt']} {result['seconds_per_correction']:.1f}s/correction "
                f"reuse {result['reuse_ratio']:.2f} gate {result['gate']}")
        if "after_accepts" in result:
            cont = result["after_accepts"]
            line += f" | after {args.accepts} accepts: facts {cont['facts']} controls {cont['controls']}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
