"""The learning recipe: what feedback trains, so that one correction teaches a fact and nothing else.

Measured on invented facts (``benchmark/learning_sweep.py``, tuned on one split of
``benchmark/data/facts.json`` and reported on the other; see docs/NOTES.md), a single SGD step
per feedback does not teach a fact, and repeated steps on the feedback alone teach it but make
the model forget the earlier facts and answer neighbouring questions with the new fact's
template. Feedback therefore becomes an **update**: optimizer steps, each over one batch of

- the feedback items themselves (weight 1 each): one, or when several wait, up to
  ``--alchemist-feedback-batch`` trained together;
- ``--alchemist-replay-feedback`` *earlier* feedback items (experience replay: keeps earlier
  facts; half of them the most similar to this feedback, half at random; at most
  ``replay_rows`` tokens between them, so long prompts do not make every step long);
- ``--alchemist-rehearsal`` guard prompts with the base model's own answers, the nearest ones
  to this feedback (``training/guard.py``: keeps what the base model knew near the relation the
  feedback touches).

Each item's loss is its mean per-token loss times its weight, normalised by the batch's total
weight, so short corrections and long rehearsal answers count alike. **An update trains until
its feedback is learnt**: after every step a forward-only check (``Trainer.check``) asks whether
greedy decoding now gives each correction word for word, end of turn included, with a margin
(:func:`learnt`; for a reject: no longer gives the rejected answer), and the update stops once
every item is - or after ``--alchemist-passes`` steps, or ``--alchemist-update-max-s`` seconds
of the training thread, whichever comes first; each feedback's journal record says how many
steps it took and whether it was learnt. A fixed number of steps (4, before) stopped with the
correction's loss still high, and the user who corrected an answer got a wrong one back from the
version that contained it. When the publish gate finds guard probes regressed, ``repair`` adds
them to the rehearsal of a few more steps (``--alchemist-gate-repairs`` rounds) before the gate
decides. An *accept* is one step: the model already said it, there is nothing new to learn, only
to reinforce (and the step still replays earlier feedback and rehearses, which is what keeps
earlier facts alive through a long run of accepts).

Where the rows come from is the trainer's business (``trainer.py``): the frozen trunk's record
makes every step, check, replayed feedback and rehearsal start at the first adapted layer.
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
    replay: int
    rehearsal: int
    replay_weight: float = 1.0
    rehearsal_weight: float = 1.0
    replay_similar_share: float = 0.5
    memory_size: int = 10_000
    rehearsal_objective: str = "distill"
    rehearsal_pool: int = 4  # the nearest ``rehearsal_pool * rehearsal`` guard prompts are drawn from
    learnt_margin: float = 0.5  # see :func:`learnt` (infinite: every update runs all its steps)
    # replayed feedback's rows per step: four short corrections fit, two long prompts at most (a
    # step of several 1,000-token replays took longer than a whole short update)
    replay_rows: int = 2048
    # how the non-similar half of the replay is drawn: "forgotten" - the items whose loss was highest
    # when last trained, plus a little per step since (``FORGET_PER_STEP``), so every item comes
    # back in time and a forgotten one keeps coming back until relearnt; "random" - uniformly
    replay_order: str = "forgotten"

    @classmethod
    def from_config(cls, config) -> RecipeSettings:
        return cls(passes=config.passes, replay=config.replay_feedback, rehearsal=config.rehearsal,
                   rehearsal_objective=config.rehearsal_objective)


@dataclass
class Remembered:
    """An earlier feedback item, kept for experience replay."""

    feedback_id: str
    prompt_ids: list[int]
    target_ids: list[int]
    objective: str
    weight: float
    words: frozenset[str]
    loss: float = 0.0  # its loss per token when it was last trained (as feedback or replayed)
    trained_at: int = 0  # the memory's step count then

    def superseded_by(self, prompt_ids: list[int], objective: str) -> bool:
        """A later wanted answer (correction or accept) to the same prompt replaces this one.

        Replaying the earlier answer would pull the model back towards what the user corrected
        since: the latest correction wins. A rejected answer (``unlikelihood``) neither replaces
        nor is replaced: it is consistent with any later correction.
        """
        wanted = self.objective != "unlikelihood" and objective != "unlikelihood"
        return wanted and self.prompt_ids == list(prompt_ids)


FORGET_PER_STEP = 0.02  # "forgotten" replay: the loss an item is presumed to gain per step it is not replayed


class FeedbackMemory:
    """The trained feedback experience replay draws from (bounded; rebuilt from the journal at start)."""

    def __init__(self, size: int) -> None:
        self.items: deque[Remembered] = deque(maxlen=size)
        self._ids: set[str] = set()
        self.steps = 0  # optimizer steps observed (the clock of ``Remembered.trained_at``)

    def note_losses(self, losses: dict[str, float]) -> None:
        """After a step: the loss per token of the remembered items it trained (by feedback id)."""
        self.steps += 1
        for item in self.items:
            if item.feedback_id in losses:
                item.loss, item.trained_at = losses[item.feedback_id], self.steps

    def forgetting(self, item: Remembered) -> float:
        return item.loss + FORGET_PER_STEP * (self.steps - item.trained_at)

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
             exclude: set[str] | frozenset[str] = frozenset(),
             superseding: list[tuple[list[int], str]] = (), max_rows: int | None = None,
             order: str = "random") -> list[Remembered]:
        """Up to ``count`` remembered items, ``similar_share`` of them the most similar to ``words``.

        ``exclude``: feedback ids left out (the ones being trained); ``superseding`` (the current
        items' prompts and objectives) leaves out what they replace; ``max_rows``: the chosen
        items' prompt and target tokens together stay within it (a long item that does not fit is
        passed over for the next candidate).
        """
        pool = [item for item in self.items if item.feedback_id not in exclude
                and not any(item.superseded_by(*pair) for pair in superseding)]
        if count <= 0 or not pool:
            return []
        similar = round(count * similar_share)
        ranked = sorted(pool, key=lambda item: -similarity(words, item.words))
        rest = ranked[similar:]
        if order == "forgotten":
            rest = sorted(rng.sample(rest, len(rest)), key=lambda item: -self.forgetting(item))
        else:
            rest = rng.sample(rest, len(rest))
        candidates = ranked[:similar] + rest
        chosen, rows = [], 0
        for item in candidates:
            size = len(item.prompt_ids) + len(item.target_ids)
            if max_rows is not None and rows + size > max_rows:
                continue
            chosen.append(item)
            rows += size
            if len(chosen) == count:
                break
        return chosen

    def __len__(self) -> int:
        return len(self.items)


class FeedbackUpdate:
    """The optimizer steps that train a batch of feedback items until the model gives them.

    ``next_batch`` until it returns None; after each step the lane calls ``observe`` with the
    step's outcome and, for corrections and rejects, ``observe_check`` with a forward-only check
    of the feedback items under the new weights (``Trainer.check``). The update stops when every
    item is *learnt* (:func:`learnt`), after ``--alchemist-passes`` steps, or once its own
    training-thread time passes ``--alchemist-update-max-s`` (``spent_s``, kept by the caller).
    """

    def __init__(self, items: list[TrainingItem], settings: RecipeSettings, memory: FeedbackMemory,
                 guard: GuardSet | None, words: frozenset[str], rng: random.Random,
                 max_seconds: float = float("inf")) -> None:
        self.items = items
        self.settings = settings
        self.memory = memory
        self.guard = guard
        self.words = words
        self.rng = rng
        self.max_seconds = max_seconds
        self.spent_s = 0.0  # training-thread seconds of this update so far (the caller adds them)
        self.passes_done = 0
        self.losses: list[float] = []  # the first feedback item's loss per token at each step
        self.item_losses: list[float] = []  # each feedback item's loss per token at the last step
        self.learnt: dict[int, bool] = {}  # item index -> the last check found its target given
        self.margins: dict[int, float] = {}  # item index -> the last check's smallest margin
        self.stop_reason: str | None = None
        self._stopped = False
        # the nearest rehearsal prompts to the batch's feedback, a pool of ``rehearsal_pool`` per draw
        self._rehearsal_pool = (guard.nearest(words, "rehearsal", settings.rehearsal_pool * settings.rehearsal)
                                if guard else [])
        self._repair: list = []  # guard probes this update broke: rehearsed in every later step
        self.max_passes = 1 if all(item.kind == "accept" for item in items) else settings.passes
        self.min_passes = 1  # a repair round runs all its steps, learnt or not

    @property
    def item(self) -> TrainingItem:
        return self.items[0]

    def repair(self, prompts: list, passes: int) -> None:
        """The publish gate found ``prompts`` regressed: ``passes`` more steps rehearse them with the rest."""
        known = {id(p) for p in self._repair}
        self._repair += [p for p in prompts if id(p) not in known and p.answer_ids]
        self.max_passes = self.min_passes = self.passes_done + passes
        self._stopped = False
        self.stop_reason = None

    def rehearsal_prompts(self):
        """The guard prompts this update may rehearse (their base answers must exist)."""
        return self._rehearsal_pool

    def next_batch(self) -> tuple[list[TrainingItem], list[float]] | None:
        if self._stopped:
            return None
        if self.passes_done >= self.max_passes:
            self.stop_reason = self.stop_reason or "max_steps"
            return None
        if self.passes_done and self.spent_s >= self.max_seconds and not self._repair:
            self.stop_reason = "max_seconds"
            return None
        settings = self.settings
        items = list(self.items)
        weights = [1.0] * len(items)
        ids = {item.feedback_id for item in self.items}
        for old in self.memory.pick(self.words, settings.replay, settings.replay_similar_share, self.rng,
                                    exclude=ids, superseding=[(i.prompt_ids, i.objective) for i in self.items],
                                    max_rows=settings.replay_rows, order=settings.replay_order):
            items.append(TrainingItem(old.feedback_id, old.prompt_ids, old.target_ids, old.objective, old.weight,
                                      role="replay"))
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
        self.losses.append(outcome.losses[0])
        self.item_losses = outcome.losses[: len(self.items)]  # the feedback items come first
        self.memory.note_losses({item.feedback_id: loss for item, loss in zip(outcome.items, outcome.losses, strict=True)
                                 if item.role == "replay" and item.feedback_id is not None})

    @property
    def checked(self) -> list[TrainingItem]:
        """The items a check follows each step for: all but accepts (an accept is one reinforcing step)."""
        return [item for item in self.items if item.kind != "accept"]

    def observe_check(self, results) -> None:
        """``results``: ``Trainer.check(self.checked)``, under the weights after the last step."""
        checked = [index for index, item in enumerate(self.items) if item.kind != "accept"]
        for index, result in zip(checked, results, strict=True):
            self.learnt[index] = learnt(self.items[index].objective, result.margins, self.settings.learnt_margin)
            if result.margins:
                self.margins[index] = min(result.margins)
        if checked and all(self.learnt.get(index) for index in checked) and self.passes_done >= self.min_passes:
            self._stopped = True
            self.stop_reason = "learnt"

    def item_learnt(self, index: int) -> bool | None:
        """Whether item ``index`` was learnt when the update stopped (None: not checked, an accept)."""
        return self.learnt.get(index)

    @property
    def first_pass(self) -> bool:
        return self.passes_done == 0


def learnt(objective: str, margins: list[float] | None, margin: float = 0.5) -> bool:
    """Whether the model now gives a feedback's answer, from a teacher-forced check.

    A wanted answer (``sft``: correction, accept, external) is learnt when greedy decoding
    reproduces every one of its tokens, the end of turn included, each ahead of the next-best
    token by ``margin`` (logits): then a greedy request of the same prompt gets exactly that answer,
    with room for the serving engine's own rounding. A rejected answer (``unlikelihood``) is
    learnt when greedy decoding leaves it somewhere: at some position another token leads it by
    that margin. Without margins (tensor parallelism) nothing counts as learnt: the update runs
    its full ``--alchemist-passes``.
    """
    if not margins:
        return False
    if objective == "unlikelihood":
        return min(margins) < -margin
    return min(margins) > margin
