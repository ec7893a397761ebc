"""The learning recipe: what one feedback trains, so that one correction teaches a fact and nothing else.

Measured on invented facts (``benchmark/learning_sweep.py``, tuned on one split of
``benchmark/data/facts.json`` and reported on the other; see docs/NOTES.md), a single SGD step
per feedback does not teach a fact, and repeated steps on the feedback alone teach it but make
the model forget the earlier facts and answer neighbouring questions with the new fact's
template. A feedback therefore becomes an **update** of up to ``--alchemist-passes`` optimizer
steps, each over one batch of:

- the feedback itself (weight 1);
- ``--alchemist-replay-feedback`` *earlier* feedback items (experience replay: keeps earlier
  facts; half of them the most similar to this feedback, half at random);
- ``--alchemist-rehearsal`` guard prompts with the base model's own answers, the nearest ones
  to this feedback (``training/guard.py``: keeps what the base model knew near the relation the
  feedback touches).

Each item's loss is its mean per-token loss times its weight, normalised by the batch's total
weight, so short corrections and long rehearsal answers count alike. The update stops early
once the feedback's own loss per token is below ``--alchemist-pass-stop-loss``. When the publish
gate finds guard probes regressed, ``repair`` adds them to the rehearsal of a few more steps
(``--alchemist-gate-repairs`` rounds) before the gate decides. An *accept* is
one pass: the model already said it, there is nothing new to learn, only to reinforce (and the
pass still replays earlier feedback and rehearses, which is what keeps earlier facts alive
through a long run of accepts).

The first pass replays the feedback's recorded prompt rows (exact: recorded with the weights
it starts from); later passes compute them, because after one step the records are stale (the
measured gradient error, in docs/NOTES.md, is too large to replay them). Earlier feedback and
rehearsal items have no records (their prompts are short chat questions).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from sglang_alchemist.training.guard import GuardSet, similarity
from sglang_alchemist.training.trainer import StepOutcome, TrainingItem


@dataclass(frozen=True)
class RecipeSettings:
    passes: int
    stop_loss: float
    replay: int
    rehearsal: int
    replay_weight: float = 1.0
    rehearsal_weight: float = 1.0
    replay_similar_share: float = 0.5
    memory_size: int = 10_000
    rehearsal_objective: str = "distill"
    rehearsal_pool: int = 4  # the nearest ``rehearsal_pool * rehearsal`` guard prompts are drawn from

    @classmethod
    def from_config(cls, config) -> RecipeSettings:
        return cls(passes=config.passes, stop_loss=config.pass_stop_loss, replay=config.replay_feedback,
                   rehearsal=config.rehearsal, rehearsal_objective=config.rehearsal_objective)


@dataclass
class Remembered:
    """An earlier feedback item, kept for experience replay."""

    feedback_id: str
    prompt_ids: list[int]
    target_ids: list[int]
    objective: str
    weight: float
    words: frozenset[str]

    def superseded_by(self, prompt_ids: list[int], objective: str) -> bool:
        """A later wanted answer (correction or accept) to the same prompt replaces this one.

        Replaying the earlier answer would pull the model back towards what the user corrected
        since: the latest correction wins. A rejected answer (``unlikelihood``) neither replaces
        nor is replaced: it is consistent with any later correction.
        """
        wanted = self.objective != "unlikelihood" and objective != "unlikelihood"
        return wanted and self.prompt_ids == list(prompt_ids)


class FeedbackMemory:
    """The trained feedback experience replay draws from (bounded; rebuilt from the journal at start)."""

    def __init__(self, size: int) -> None:
        self.items: deque[Remembered] = deque(maxlen=size)
        self._ids: set[str] = set()

    def add(self, item: Remembered) -> None:
        if item.feedback_id in self._ids:
            return
        superseded = [old.feedback_id for old in self.items if old.superseded_by(item.prompt_ids, item.objective)]
        if superseded:
            self.forget(superseded)
        if len(self.items) == self.items.maxlen:
            self._ids.discard(self.items[0].feedback_id)
        self.items.append(item)
        self._ids.add(item.feedback_id)

    def forget(self, feedback_ids: list[str]) -> None:
        """After a rollback or a gate rejection: that feedback is no longer part of what was learned."""
        drop = set(feedback_ids)
        kept = [item for item in self.items if item.feedback_id not in drop]
        self.items.clear()
        self.items.extend(kept)
        self._ids -= drop

    def pick(self, words: frozenset[str], count: int, similar_share: float, rng: random.Random,
             exclude: str | None = None, superseding: tuple[list[int], str] | None = None) -> list[Remembered]:
        """Up to ``count`` remembered items, ``similar_share`` of them the most similar to ``words``.

        ``superseding`` (the current item's prompt and objective) leaves out what it replaces.
        """
        pool = [item for item in self.items if item.feedback_id != exclude
                and not (superseding and item.superseded_by(*superseding))]
        if count <= 0 or not pool:
            return []
        similar = round(count * similar_share)
        ranked = sorted(pool, key=lambda item: -similarity(words, item.words))
        chosen = ranked[:similar]
        rest = [item for item in pool if item not in chosen]
        chosen += rng.sample(rest, min(len(rest), count - len(chosen)))
        return chosen

    def __len__(self) -> int:
        return len(self.items)


class FeedbackUpdate:
    """The optimizer steps one feedback item trains (``next_batch`` until it returns None)."""

    def __init__(self, item: TrainingItem, settings: RecipeSettings, memory: FeedbackMemory,
                 guard: GuardSet | None, words: frozenset[str], rng: random.Random) -> None:
        self.item = item
        self.settings = settings
        self.memory = memory
        self.guard = guard
        self.words = words
        self.rng = rng
        self.passes_done = 0
        self.losses: list[float] = []
        self._stopped = False
        self._rehearsal_pool = (guard.nearest(words, "rehearsal", settings.rehearsal_pool * settings.rehearsal)
                                if guard else [])
        self._repair: list = []  # guard probes this update broke: rehearsed in every later step
        self.max_passes = 1 if item.kind == "accept" else settings.passes

    def repair(self, prompts: list, passes: int) -> None:
        """The publish gate found ``prompts`` regressed: ``passes`` more steps rehearse them with the rest."""
        known = {id(p) for p in self._repair}
        self._repair += [p for p in prompts if id(p) not in known and p.answer_ids]
        self.max_passes = self.passes_done + passes
        self._stopped = False

    def rehearsal_prompts(self):
        """The guard prompts this update may rehearse (their base answers must exist)."""
        return self._rehearsal_pool

    def next_batch(self) -> tuple[list[TrainingItem], list[float]] | None:
        if self._stopped or self.passes_done >= self.max_passes:
            return None
        settings = self.settings
        items = [self.item]
        weights = [1.0]
        for old in self.memory.pick(self.words, settings.replay, settings.replay_similar_share, self.rng,
                                    exclude=self.item.feedback_id,
                                    superseding=(self.item.prompt_ids, self.item.objective)):
            items.append(TrainingItem(None, old.prompt_ids, old.target_ids, old.objective, old.weight, role="replay"))
            weights.append(settings.replay_weight)
        ready = [p for p in self._rehearsal_pool if p.answer_ids]
        for prompt in [*self.rng.sample(ready, min(len(ready), settings.rehearsal)), *self._repair]:
            distill = settings.rehearsal_objective == "distill" and prompt.teacher is not None
            items.append(TrainingItem(None, prompt.prompt_ids, prompt.answer_ids, "distill" if distill else "sft",
                                      1.0, role="rehearsal", teacher=prompt.teacher if distill else None))
            weights.append(settings.rehearsal_weight)
        # mean loss per token, weighted within the batch (an item's own ``weight`` is applied by the step)
        total = sum(weights)
        return items, [w / (len(item.target_ids) * total) for w, item in zip(weights, items, strict=True)]

    def observe(self, outcome: StepOutcome) -> None:
        self.passes_done += 1
        loss = outcome.losses[0]
        self.losses.append(loss)
        if self.settings.stop_loss > 0 and loss < self.settings.stop_loss:
            self._stopped = True

    @property
    def first_pass(self) -> bool:
        return self.passes_done == 0
