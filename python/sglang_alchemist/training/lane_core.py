"""The learning loop without threads or SGLang: one update per feedback batch, the guard, the gate.

``LearningCore.prepare()`` readies what every update reads - the base model's answers to the
whole guard bank, the output anchor, the trunk's records of the rehearsal prompts - from the
machine-wide cache ``scripts/setup.sh`` fills (``training/learner_cache.py``), computing what is
missing; the lane runs it first, while the server is otherwise idle, and ``ready`` says when
it is done.

``LearningCore.update(items)`` is a generator of slices (like a training step) that trains a
batch of feedback items (one, or several that waited together) completely:

1. make sure the guard prompts it needs have the base model's answers (``training/guard.py``:
   computed once per prompt by greedy decoding with the adapter off, then cached);
2. run the recipe's optimizer steps (``training/recipe.py``): the feedback plus replayed
   earlier feedback plus rehearsed guard prompts, each step followed by a forward-only check of
   whether the model now gives the feedback, until it does (or ``--alchemist-passes`` steps, or
   ``--alchemist-update-max-s`` seconds of the training thread);
3. **the publish gate**: answer the nearest gate prompts and the user's probes with the
   candidate (with ``--alchemist-adapter-scope feedback``, only the probes the candidate version
   would answer with its adapter: the base model answers the rest, unchanged); a probe
   regresses when its answer loses what the base model's named. A probe the
   last accepted state (the served version) already gets wrong is *inherited*, not counted
   against this update: refusing it would change nothing (and refused every accept once an
   earlier version had broken a nearby probe). If more probes regress than
   ``--alchemist-gate-max-regressions`` allows, up to ``--alchemist-gate-repairs`` repair rounds
   rehearse the regressed and inherited probes (with the feedback; corrections and rejects only)
   and check again; if they still regress, the weights go back to the last accepted state and
   the update is reported *rejected* with the reason.

The scheduler's training lane drives it slice by slice and publishes accepted updates as
versions; ``benchmark/learning_sweep.py`` drives it at once to tune the recipe offline. Both
therefore measure exactly the same learning.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

from sglang_alchemist.feedback.scope import Learnt, Scope
from sglang_alchemist.training.generate import greedy_generate, teacher_forced
from sglang_alchemist.training.guard import (
    ANSWER_TOKENS,
    GATE_FLIPS,
    GATE_LOST_SHARE,
    TEACHER_TOP_K,
    GateResult,
    GuardPrompt,
    GuardSet,
    recall,
)
from sglang_alchemist.training.lora import LoraAdapter
from sglang_alchemist.training.model_spec import FrozenModel
from sglang_alchemist.training.preserve import OutputAnchor, PreservedSubspaces
from sglang_alchemist.training.recipe import FeedbackMemory, FeedbackUpdate, RecipeSettings, Remembered
from sglang_alchemist.training.step import SliceInfo, SlicePlanner, run_to_completion
from sglang_alchemist.training.trainer import AdapterSnapshot, Trainer, TrainerSettings, TrainingItem
from sglang_alchemist.training.trunk import TrunkRecords, trunk_key, trunk_residuals
from sglang_alchemist.training.versions import VersionHistory

logger = logging.getLogger(__name__)

GUARD_BATCH = 16  # guard prompts answered per decoding batch
REPAIR_PASSES = 2  # optimizer steps per repair round


@dataclass
class UpdateOutcome:
    items: list[TrainingItem]
    accepted: bool
    passes: int  # optimizer steps the update took (repairs included)
    losses: list[float]  # the first feedback item's loss per token at each step
    gate: GateResult | None
    seconds: float  # wall time from its first slice to its end
    paths: list[str] = field(default_factory=list)  # the first feedback item's path at each step
    learnt: list[bool | None] = field(default_factory=list)  # per item: the last check found it learnt
    margins: list[float | None] = field(default_factory=list)  # per item: the last check's smallest margin
    stop_reason: str | None = None  # learnt, max_steps, max_seconds
    busy_seconds: float = 0.0  # training-thread seconds the update took

    @property
    def gate_probes(self) -> int:
        """Probes the publish gate checked before this update's verdict (0: it had nothing to check)."""
        return self.gate.probes if self.gate is not None else 0

    @property
    def item(self) -> TrainingItem:
        return self.items[0]

    def public(self) -> dict:
        return {"feedback_ids": [item.feedback_id for item in self.items], "accepted": self.accepted,
                "steps": self.passes, "learnt": self.learnt, "margins": self.margins,
                "stop_reason": self.stop_reason, "losses": self.losses, "gate_probes": self.gate_probes,
                "gate": self.gate.public() if self.gate else None, "seconds": self.seconds,
                "busy_seconds": self.busy_seconds, "paths": self.paths}


@dataclass
class GateCounters:
    checks: int = 0  # gate verdicts that checked at least one probe (repair rounds included)
    probes_checked: int = 0  # probes answered over all of them
    updates_unchecked: int = 0  # updates published with no probe to check (none in the candidate's scope)
    rejections: int = 0
    last_rejection: dict | None = None


class LearningCore:
    def __init__(self, model: FrozenModel, config, guard: GuardSet | None, stop_ids: set[int], state_dir: Path,
                 max_positions: int, guard_cache: Path | None = None, seed: int = 0,
                 recipe_overrides: dict | None = None, history: VersionHistory | None = None) -> None:
        self.model = model
        self.config = config
        self.guard = guard
        self.stop_ids = stop_ids
        self.history = history or VersionHistory.load(Path(state_dir or tempfile.mkdtemp()) / "adapters",
                                                      config.keep_checkpoints)
        self.trainer = Trainer(model, TrainerSettings.from_config(config, model.geometry.num_layers), self.history,
                               max_positions, seed=seed)
        self.max_update_s = getattr(config, "update_max_s", float("inf"))
        self.recipe = dataclasses.replace(RecipeSettings.from_config(config), **(recipe_overrides or {}))
        self.memory = FeedbackMemory(self.recipe.memory_size)
        self.rng = random.Random(seed)
        self.good: AdapterSnapshot = self.trainer.snapshot()
        self.gate = GateCounters()
        # the gate's view of the served version: (accepted state, adapter with its weights) and
        # which probes that state already regresses (probe key -> regressed), filled lazily
        self._served: tuple[AdapterSnapshot, LoraAdapter] | None = None
        self._served_regressed: dict[str, bool] = {}
        self.gate_probes = config.gate_probes
        # the served scope (feedback/scope.py): which requests the served adapter answers. The gate
        # checks only the probes a candidate version would answer with its adapter; the base model
        # answers the others when served, so they cannot regress.
        self.scope_mode = getattr(config, "adapter_scope", "all") if getattr(config, "cluster_size", 1) == 1 else "all"
        self.scope: Scope | None = self._new_scope() if guard is not None else None
        self.gate_max_regressions = config.gate_max_regressions
        self.gate_repairs = config.gate_repairs
        self.guard_cache = guard_cache
        self.fingerprint = ""
        if guard is not None and guard_cache is not None:
            guard.load_answers(guard_cache)
        self.preserve_energy = config.preserve_energy if guard is not None else 0.0
        self.subspaces: PreservedSubspaces | None = None
        if self.preserve_energy > 0 and self._subspace_cache is not None:
            self.subspaces = PreservedSubspaces.load(self._subspace_cache)
        self.anchor_weight = config.anchor_weight if guard is not None else 0.0
        if self.anchor_weight > 0 and self._anchor_cache is not None:
            self.trainer.anchor = OutputAnchor.load(self._anchor_cache, model, self.anchor_weight)
        self._prepared = False
        self._preparing: dict = {}
        # what ``prepare`` computed (the rest came from the cache): guard answers, anchor, trunk records
        self._prepared_work: dict = {"computed": {}}

    # --- one feedback -------------------------------------------------------------------------

    def update(self, items: list[TrainingItem] | TrainingItem, planner: SlicePlanner | None = None,
               ) -> Generator[SliceInfo, None, UpdateOutcome]:
        items = [items] if isinstance(items, TrainingItem) else list(items)
        started = time.monotonic()
        words = frozenset().union(*(self.guard.words_of(item.prompt_ids) for item in items)) \
            if self.guard is not None else frozenset()
        update = FeedbackUpdate(items, self.recipe, self.memory, self.guard, words, self.rng, self.max_update_s)
        learnt = [self.scope.describe(self.guard.decode(item.prompt_ids)) for item in items] \
            if self.scope is not None else []
        probes = self._gate_probes(words, learnt)
        yield from self._ensure_answers([*update.rehearsal_prompts(), *probes])
        yield from self.prepare()
        paths = []
        gate = None
        repairs = 0
        while True:
            yield from self.train_steps(update, planner, paths)
            if not probes or self.gate_max_regressions < 0:
                break
            gate = yield from _timed(self._check(probes), update)
            gate.repairs = repairs
            mend = self.to_repair(gate, items, repairs)
            if not mend:
                break
            # rehearse what is broken, with the feedback still in every step, then check again
            update.repair(mend, REPAIR_PASSES)
            repairs += 1
        accepted = gate is None or gate.passed
        if gate is None or gate.probes == 0:
            self.gate.updates_unchecked += 1
        if accepted:
            self.good = self.trainer.snapshot()
            for index, (item, description) in enumerate(zip(items, learnt or [None] * len(items), strict=True)):
                if item.feedback_id is None:
                    continue
                if description is not None:
                    self.scope.add(description)
                loss = update.item_losses[index] if index < len(update.item_losses) else 0.0
                self.memory.add(Remembered(item.feedback_id, item.prompt_ids, item.target_ids, item.objective,
                                           item.weight, self.guard.words_of(item.prompt_ids)
                                           if self.guard is not None else frozenset(), loss, self.memory.steps))
        else:
            self.trainer.restore(self.good)
            self.gate.rejections += 1
            self.gate.last_rejection = {"feedback_ids": [item.feedback_id for item in items], "at": time.time(),
                                        **gate.public()}
        return UpdateOutcome(items, accepted, update.passes_done, update.losses, gate, time.monotonic() - started,
                             paths, learnt=[update.item_learnt(i) for i in range(len(items))],
                             margins=[update.margins.get(i) for i in range(len(items))],
                             stop_reason=update.stop_reason, busy_seconds=update.spent_s)

    def train_steps(self, update: FeedbackUpdate, planner: SlicePlanner | None, paths: list[str],
                    ) -> Generator[SliceInfo, None, None]:
        """The update's optimizer steps, each followed by the check of its feedback, until it stops."""
        while (batch := update.next_batch()) is not None:
            yield from self.one_step(update, batch, planner, paths)

    def one_step(self, update: FeedbackUpdate, batch, planner: SlicePlanner | None, paths: list[str],
                 sync_weight: float = 1.0) -> Generator[SliceInfo, None, None]:
        """One optimizer step of ``update`` over ``batch`` (``next_batch``'s), then its check."""
        items, scales = batch
        outcome = yield from _timed(self.trainer.step(items, scales, planner, sync_weight=sync_weight), update)
        if self.subspaces is not None:
            self.subspaces.project(self.trainer.adapter)
        update.observe(outcome)
        paths.append(outcome.paths[0])
        if update.checked and update.passes_done < update.max_passes:
            results = yield from _timed(self.trainer.check(update.checked, planner), update)
            update.observe_check(results)
        elif update.checked:  # the last allowed step: check once more, to report what it reached
            update.observe_check((yield from _timed(self.trainer.check(update.checked, planner), update)))

    def to_repair(self, gate: GateResult, items: list[TrainingItem], repairs: int) -> list[GuardPrompt]:
        """The probes a repair round should rehearse after ``gate``; empty: the verdict stands.

        An accept teaches nothing new: one that regresses probes is not worth repairing, only
        refusing. A correction or a reject is repaired while rounds are left, when it regressed
        probes or when probes the served version had already lost are near it (healing them).
        """
        if all(item.kind == "accept" for item in items) or repairs >= self.gate_repairs:
            return []
        if gate.passed and not gate.inherited_prompts:
            return []
        return [*gate.regressed_prompts, *gate.inherited_prompts]

    def train_feedback(self, feedback_id: str, prompt_ids: list[int], target_ids: list[int],
                       kind: str = "correction", objective: str = "sft") -> dict:
        """Train one feedback item at once (offline use: benchmarks, tests)."""
        item = TrainingItem(feedback_id, list(prompt_ids), list(target_ids), objective, kind=kind)
        return run_to_completion(self.update([item])).public()

    def remember(self, feedback_id: str, prompt_ids: list[int], target_ids: list[int], objective: str,
                 weight: float) -> None:
        """Feedback trained before a restart joins experience replay again (from the journal)."""
        words = self.guard.words_of(prompt_ids) if self.guard is not None else frozenset()
        self.memory.add(Remembered(feedback_id, list(prompt_ids), list(target_ids), objective, weight, words))
        if self.scope is not None:
            self.scope.add(self.scope.describe(self.guard.decode(prompt_ids)))

    def reset_scope(self, prompts: list[list[int]]) -> None:
        """The served scope after a rollback: the prompts of the feedback on the new lineage."""
        if self.scope is not None:
            self.scope = self._new_scope()
            for prompt_ids in prompts:
                self.scope.add(self.scope.describe(self.guard.decode(prompt_ids)))

    def _new_scope(self) -> Scope | None:
        """The served version's scope as the HTTP process builds it (``api/routes.py``), for the gate."""
        if self.scope_mode == "all":
            return None
        encoder = general = None
        if self.scope_mode == "feedback":
            from sglang_alchemist.feedback.meaning import background, shared_encoder

            encoder = shared_encoder()
            general = background(encoder) if encoder is not None else None
        return Scope.for_template(self.guard.template_text, self.guard.special_tokens, encoder, general)

    # --- guard --------------------------------------------------------------------------------

    def _gate_probes(self, words: frozenset[str], learnt: list[Learnt] = ()) -> list[GuardPrompt]:
        """The nearest bank gate questions and the user's probes; with a scope, only those the
        candidate (the served scope plus ``learnt``, this update's feedback prompts) answers with its adapter."""
        if self.guard is None or self.gate_max_regressions < 0:
            return []
        probes = [*self.guard.nearest(words, "gate", self.gate_probes, keyed=True), *self.guard.user_probes]
        if self.scope is None:
            return probes
        return [p for p in probes if self.scope.covers(self.guard.decode(p.prompt_ids), also=learnt)]

    def _ensure_answers(self, prompts: list[GuardPrompt]) -> Generator[SliceInfo, None, None]:
        """Base answers (adapter off) and their base score for every prompt that lacks them."""
        unanswered = [p for p in prompts if p.answer_ids is None]
        for start in range(0, len(unanswered), GUARD_BATCH):
            batch = unanswered[start : start + GUARD_BATCH]
            outputs = yield from greedy_generate(self.model, None, [p.prompt_ids for p in batch], ANSWER_TOKENS,
                                                 self.stop_ids)
            for prompt, output in zip(batch, outputs, strict=True):
                prompt.answer_ids = output
        unscored = [p for p in prompts if (p.base_flips is None or p.teacher is None) and p.answer_ids]
        if unscored:
            scores = yield from teacher_forced(self.model, None, [(p.prompt_ids, p.answer_ids) for p in unscored],
                                               top_k=TEACHER_TOP_K)
            for prompt, score in zip(unscored, scores, strict=True):
                prompt.base_flips = score.agree.count(False)
                prompt.teacher = score.teacher
        unrecalled = [p for p in prompts if p.base_recall is None and p.answer_ids]
        for prompt in unrecalled:
            if prompt.pool != "user":  # the bank's expected answers are the base model's own
                prompt.base_recall = 1.0
        asked = [p for p in unrecalled if p.pool == "user"]
        for start in range(0, len(asked), GUARD_BATCH):
            batch = asked[start : start + GUARD_BATCH]
            outputs = yield from greedy_generate(self.model, None, [p.prompt_ids for p in batch], ANSWER_TOKENS,
                                                 self.stop_ids)
            for prompt, output in zip(batch, outputs, strict=True):
                prompt.base_recall = recall(self._key_words(prompt), self._text(output))
        unscored = unscored or unrecalled
        if (unanswered or unscored) and self.guard_cache is not None:
            try:
                self.guard.save_answers(self.guard_cache)
            except OSError as error:  # a full disk costs a recomputation after a restart, nothing more
                logger.warning("sglang_alchemist: could not cache guard answers: %s", error)

    @property
    def _subspace_cache(self) -> Path | None:
        if self.guard_cache is None:
            return None
        return self.guard_cache.with_name(self.guard_cache.stem + f"-subspaces-{self.preserve_energy:g}.pt")

    @property
    def _anchor_cache(self) -> Path | None:
        if self.guard_cache is None:
            return None
        return self.guard_cache.with_name(self.guard_cache.stem + "-anchor.pt")

    @property
    def _trunk_cache(self) -> Path | None:
        if self.guard_cache is None:
            return None
        return self.guard_cache.with_name(self.guard_cache.stem + f"-trunk-{self.trainer.adapter.first_layer}.pt")

    @property
    def ready(self) -> bool:
        """Whether ``prepare`` has nothing left to do (every update then starts training at once)."""
        return self._prepared

    def preparation(self) -> dict:
        """Where ``prepare`` stands, and what it had to compute rather than load (status: ``training.learner``)."""
        return {"ready": self._prepared, **self._preparing, **self._prepared_work}

    def prepare(self) -> Generator[SliceInfo, None, None]:
        """Everything an update reads ahead of time, computed once per model and cached.

        The base model's answers to the whole guard bank (rehearsal targets, gate probes), the
        output anchor and/or the preserved subspaces (both read those answers), and the trunk's
        records of the bank's rehearsal prompts. ``scripts/setup.sh`` computes them for the default
        model into the machine-wide cache (``training/learner_cache.py``), where a fresh server
        finds them; for another model the lane runs this before its first update, while the server
        is otherwise idle, and status says when it is done. Feedback arriving meanwhile is
        journaled and queued as always.
        """
        if self._prepared:
            return
        if self.guard is None:
            self._prepared = True
            return
        bank = [p for p in self.guard.prompts if p.pool != "user"]
        unanswered = [p for p in bank if p.answer_ids is None or p.teacher is None or p.base_flips is None]
        computed = self._prepared_work["computed"]
        computed["guard_answers"] = len(unanswered)
        self._preparing = {"stage": "guard_answers", "done": len(bank) - len(unanswered), "of": len(bank)}
        for start in range(0, len(unanswered), GUARD_BATCH):
            yield from self._ensure_answers(unanswered[start : start + GUARD_BATCH])
            self._preparing["done"] = min(len(bank), self._preparing["done"] + GUARD_BATCH)
        sequences = [p.prompt_ids + p.answer_ids for p in bank if p.answer_ids]
        computed["output_anchor"] = self.anchor_weight > 0 and self.trainer.anchor is None
        if self.anchor_weight > 0 and self.trainer.anchor is None:
            self._preparing = {"stage": "output_anchor"}
            anchor = yield from OutputAnchor.compute(self.model, sequences, self.anchor_weight)
            self.trainer.anchor = anchor
            logger.info("sglang_alchemist: output anchor ready (mean covariance rank %s)", anchor.rank())
            self._cache(anchor, self._anchor_cache)
        if self.preserve_energy > 0 and self.subspaces is None:
            self._preparing = {"stage": "preserved_subspaces"}
            self.subspaces = yield from PreservedSubspaces.compute(self.model, sequences, self.preserve_energy,
                                                                    max_rank=3 * self.model.geometry.hidden_size // 4)
            logger.info("sglang_alchemist: knowledge-preserving subspaces ready (mean rank %s)", self.subspaces.rank())
            self._cache(self.subspaces, self._subspace_cache)
        yield from self._prepare_trunk([p for p in bank if p.pool == "rehearsal" and p.answer_ids])
        self._preparing = {}
        self._prepared = True

    def _prepare_trunk(self, prompts: list[GuardPrompt]) -> Generator[SliceInfo, None, None]:
        """The trunk's records of the rehearsal prompts with their base answers (pinned: every update uses them)."""
        trunk = self.trainer.trunk
        if not trunk.enabled:
            return
        keys = [trunk_key(p.prompt_ids, p.answer_ids) for p in prompts]
        cached = TrunkRecords.load_file(self._trunk_cache) if self._trunk_cache is not None else {}
        missing = [key for key in keys if key not in cached]
        self._prepared_work["computed"]["trunk_records"] = len(missing)
        self._preparing = {"stage": "trunk_records", "done": len(keys) - len(missing), "of": len(keys)}
        computed = {}
        for start in range(0, len(missing), GUARD_BATCH):
            batch = missing[start : start + GUARD_BATCH]
            rows = yield from trunk_residuals(self.model, [list(key) for key in batch], trunk.first_layer)
            computed.update(zip(batch, rows, strict=True))
            self._preparing["done"] += len(batch)
        for key in keys:
            trunk.put(key, computed[key] if key in computed else cached[key], pinned=True)
        if computed and self._trunk_cache is not None:
            try:
                TrunkRecords.save_file(self._trunk_cache, {key: computed.get(key, cached.get(key)) for key in keys})
            except OSError as error:  # a full disk costs a recomputation after a restart, nothing more
                logger.warning("sglang_alchemist: could not cache %s: %s", self._trunk_cache.name, error)

    @staticmethod
    def _cache(statistics, path: Path | None) -> None:
        if path is None:
            return
        try:
            statistics.save(path)
        except OSError as error:  # a full disk costs a recomputation after a restart, nothing more
            logger.warning("sglang_alchemist: could not cache %s: %s", path.name, error)

    def _check(self, probes: list[GuardPrompt]) -> Generator[SliceInfo, None, GateResult]:
        """Answer the probes with the candidate; which ones regressed (``training/guard.py``).

        A regressed probe is checked once more with the served version's weights (cached per
        accepted state): where that one regresses too, the probe is *inherited*, not counted.
        """
        # a bank probe counts only where the base model knows the answer (its own answer names a key)
        probes = [p for p in probes if p.answer_ids and (p.pool == "user" or self._names_a_key(p, p.answer_ids))]
        if probes:
            self.gate.checks += 1
            self.gate.probes_checked += len(probes)
        found = yield from self._regressions(self.trainer.adapter, probes)
        inherited: list[tuple[GuardPrompt, dict]] = []
        if found:
            served = self._served_adapter()
            unknown = [p for p, _ in found if p.key() not in self._served_regressed]
            if unknown:
                already = {p.key() for p, _ in (yield from self._regressions(served, unknown))}
                self._served_regressed.update({p.key(): p.key() in already for p in unknown})
            inherited = [(p, d) for p, d in found if self._served_regressed[p.key()]]
            found = [(p, d) for p, d in found if not self._served_regressed[p.key()]]
        regressed = [detail for _, detail in found]
        passed = len(regressed) <= self.gate_max_regressions
        reason = None if passed else (
            f"{len(regressed)} of {len(probes)} guard probes regressed (allowed: {self.gate_max_regressions}): "
            + "; ".join(r["question"] for r in regressed[:5])
        )
        return GateResult(passed, len(probes), regressed, reason, regressed_prompts=[p for p, _ in found],
                          inherited=[detail for _, detail in inherited],
                          inherited_prompts=[p for p, _ in inherited])

    def _served_adapter(self) -> LoraAdapter:
        """An adapter holding the last accepted state's weights (rebuilt when that state changes)."""
        if self._served is None or self._served[0] is not self.good:
            adapter = self._served[1] if self._served is not None else LoraAdapter(
                self.trainer.adapter.spec, self.model.geometry, self.model.device)
            adapter.load_peft_state_dict(self.good.adapter)
            self._served = (self.good, adapter)
            self._served_regressed = {}
        return self._served[1]

    def _regressions(self, adapter: LoraAdapter, probes: list[GuardPrompt]
                     ) -> Generator[SliceInfo, None, list[tuple[GuardPrompt, dict]]]:
        """The probes whose answers under ``adapter`` lost what the base model's named, with details."""
        known = [p for p in probes if p.pool != "user"]
        keyed = [p for p in probes if p.pool == "user" and self._key_words(p)]
        flipped = [p for p in probes if p.pool == "user" and not self._key_words(p)]
        regressed: list[tuple[GuardPrompt, dict]] = []
        for start in range(0, len(known) + len(keyed), GUARD_BATCH):
            batch = [*known, *keyed][start : start + GUARD_BATCH]
            outputs = yield from greedy_generate(self.model, adapter, [p.prompt_ids for p in batch],
                                                 ANSWER_TOKENS, self.stop_ids)
            for prompt, output in zip(batch, outputs, strict=True):
                answer = self._text(output)
                if prompt.pool != "user":
                    if not self._names_a_key(prompt, output):
                        regressed.append((prompt, {"question": prompt.question, "pool": prompt.pool, "deficit": 1.0,
                                                   "keys": list(prompt.keys), "answer": answer}))
                    continue
                share = recall(prompt.key_words, answer)
                base = prompt.base_recall if prompt.base_recall is not None else 1.0
                if base > 0 and share <= base - GATE_LOST_SHARE:
                    regressed.append((prompt, {"question": prompt.question, "pool": prompt.pool,
                                               "deficit": base - share, "key_words": sorted(prompt.key_words),
                                               "answer": answer}))
        if flipped:
            scores = yield from teacher_forced(self.model, adapter, [(p.prompt_ids, p.answer_ids) for p in flipped])
            for prompt, score in zip(flipped, scores, strict=True):
                flips = score.agree.count(False)
                if flips >= (prompt.base_flips or 0) + GATE_FLIPS:
                    regressed.append((prompt, {"question": prompt.question, "pool": prompt.pool,
                                               "deficit": flips - (prompt.base_flips or 0), "flips": flips,
                                               "base_flips": prompt.base_flips,
                                               "first_flip": score.first_disagreement}))
        return regressed

    def _text(self, ids: list[int]) -> str:
        return self.guard.decode([t for t in ids if t not in self.stop_ids])

    def _names_a_key(self, prompt: GuardPrompt, ids: list[int]) -> bool:
        text = self._text(ids).lower()
        return any(key.lower() in text for key in prompt.keys)

    def _key_words(self, prompt: GuardPrompt) -> frozenset[str]:
        return self.guard.key_words_of(prompt, frozenset(self.stop_ids))

    def gate_counters(self) -> dict:
        return {"checks": self.gate.checks, "probes_checked": self.gate.probes_checked,
                "updates_unchecked": self.gate.updates_unchecked, "rejections": self.gate.rejections,
                "last_rejection": self.gate.last_rejection}


def _timed(work: Generator[SliceInfo, None, object], update: FeedbackUpdate) -> Generator[SliceInfo, None, object]:
    """Run ``work``, adding the time it computes (not the pauses between its slices) to ``update.spent_s``."""
    while True:
        started = time.perf_counter()
        try:
            info = next(work)
        except StopIteration as finished:
            update.spent_s += time.perf_counter() - started
            return finished.value
        update.spent_s += time.perf_counter() - started
        yield info
