"""The training lane of the scheduler: a queue of feedback items and a resumable optimizer step.

The scheduler gives the lane a time budget after each serving batch and while idle
(``scheduler/controller.py`` decides how much). ``run(budget_s)`` advances the current step
one slice at a time (a layer of one sample's forward or backward, see ``training/step.py``)
until the budget is spent; a step left unfinished continues at the next call, so no work is
lost between serving batches. When a step completes, the optimizer has stepped; every
``--alchemist-publish-every`` steps the adapter is published as a new version and the journal
marks the step's feedback records ``trained`` in that version.

Batching: a step starts with up to ``--alchemist-batch-samples`` queued items, as soon as the
queue holds that many, or once the oldest item has waited ``BATCH_WAIT_S``, or at once when
the engine is idle.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from sglang_alchemist.feedback.journal import Journal
from sglang_alchemist.training.step import SliceInfo
from sglang_alchemist.training.trainer import StepOutcome, Trainer, TrainingItem
from sglang_alchemist.training.versions import VersionInfo

logger = logging.getLogger(__name__)

BATCH_WAIT_S = 2.0
MAX_ATTEMPTS = 2


@dataclass
class LaneCounters:
    items_enqueued: int = 0
    items_dropped: int = 0
    slices_run: int = 0
    steps_completed: int = 0
    versions_published: int = 0
    busy_seconds: float = 0.0
    last_slice_seconds: float = 0.0
    slice_kinds: dict = field(default_factory=lambda: {"forward": 0, "head": 0, "backward": 0})


class TrainingLane:
    def __init__(self, trainer: Trainer, journal: Journal, batch_samples: int, publish_every: int,
                 on_publish: Callable[[VersionInfo], None], release_sample: Callable[[object], None]) -> None:
        self.trainer = trainer
        self.journal = journal
        self.batch_samples = batch_samples
        self.publish_every = publish_every
        self.on_publish = on_publish
        self.release_sample = release_sample
        self.queue: deque[TrainingItem] = deque()
        self.paused = False
        self.counters = LaneCounters()
        self._known: set[str] = set()
        self._step: Generator[SliceInfo, None, StepOutcome] | None = None
        self._step_items: list[TrainingItem] = []
        self._trained_unpublished: list[str] = []
        self.last_outcome: StepOutcome | None = None

    # --- queue ------------------------------------------------------------------------------

    def enqueue(self, item: TrainingItem) -> bool:
        """Queue an item; False if it was already known or cannot be trained (journaled as dropped)."""
        if item.feedback_id in self._known:
            return False
        self._known.add(item.feedback_id)
        reason = None
        if not item.target_ids:
            reason = "empty_target"
        elif self.trainer.too_long(item):
            reason = "too_long"
        if reason is not None:
            self.journal.mark_dropped([item.feedback_id], reason)
            self.counters.items_dropped += 1
            self._release(item)
            return False
        self.queue.append(item)
        self.counters.items_enqueued += 1
        return True

    @property
    def step_in_progress(self) -> bool:
        return self._step is not None

    def has_work(self) -> bool:
        return not self.paused and (self._step is not None or bool(self.queue))

    def ready_to_start(self, idle: bool, now: float | None = None) -> bool:
        if not self.queue:
            return False
        now = time.monotonic() if now is None else now
        return idle or len(self.queue) >= self.batch_samples or now - self.queue[0].enqueued_at >= BATCH_WAIT_S

    # --- running -----------------------------------------------------------------------------

    def next_slice_tokens(self) -> int:
        """Rough size of the next slice (tokens through one layer), for the cost model."""
        items = self._step_items or list(self.queue)[: self.batch_samples]
        if not items:
            return 0
        item = items[0]
        return len(item.prompt_ids) + len(item.target_ids)

    def run_one_slice(self, idle: bool) -> SliceInfo | None:
        """Advance training by one slice; None when there is nothing to do right now."""
        if self.paused:
            return None
        if self._step is None:
            if not self.ready_to_start(idle):
                return None
            self._step_items = [self.queue.popleft() for _ in range(min(self.batch_samples, len(self.queue)))]
            self._step = self.trainer.step(self._step_items)
        started = time.perf_counter()
        try:
            info = next(self._step)
        except StopIteration as finished:
            self._complete(finished.value)
            info = SliceInfo("optimizer", -1, 0)
        except Exception:
            logger.exception("sglang_alchemist: a training step failed; its items are requeued")
            self._abandon_step()
            raise
        elapsed = time.perf_counter() - started
        self.counters.slices_run += 1
        self.counters.busy_seconds += elapsed
        self.counters.last_slice_seconds = elapsed
        if info.phase in self.counters.slice_kinds:
            self.counters.slice_kinds[info.phase] += 1
        return info

    def run(self, budget_s: float, idle: bool) -> float:
        """Run slices until ``budget_s`` is spent; returns the seconds used."""
        started = time.perf_counter()
        while time.perf_counter() - started < budget_s:
            if self.run_one_slice(idle) is None:
                break
        return time.perf_counter() - started

    def flush_publish(self) -> VersionInfo | None:
        """Publish now if trained steps are waiting for a version (e.g. on an explicit request)."""
        if self.trainer.steps_since_publish == 0:
            return None
        return self._publish()

    def _complete(self, outcome: StepOutcome) -> None:
        self._step, items, self._step_items = None, self._step_items, []
        self.last_outcome = outcome
        self.counters.steps_completed += 1
        self._trained_unpublished += [item.feedback_id for item in items]
        for item in items:
            self._release(item)
        if self.trainer.steps_since_publish >= self.publish_every:
            self._publish()

    def _publish(self) -> VersionInfo:
        info = self.trainer.publish()
        self.journal.mark_trained(self._trained_unpublished, info.version)
        self._trained_unpublished = []
        self.counters.versions_published += 1
        self.on_publish(info)
        return info

    def _abandon_step(self, failed: bool = True) -> None:
        """Put an unfinished step's items back (they train by recomputation), clear its gradients.

        An item whose step failed twice is dropped (journaled with reason ``training_error``)
        rather than retried forever.
        """
        self.trainer.adapter.zero_grad()
        for item in reversed(self._step_items):
            self._release(item)
            item.attempts += int(failed)
            if item.attempts >= MAX_ATTEMPTS:
                self.journal.mark_dropped([item.feedback_id], "training_error")
                self.counters.items_dropped += 1
            else:
                self.queue.appendleft(item)
        self._step, self._step_items = None, []

    def discard_unpublished(self) -> None:
        """After a rollback: drop the unpublished trained steps; requeue the unfinished step's items.

        Steps trained since the last publish changed weights that the rollback threw away; their
        feedback is journaled as dropped (``rolled_back``) rather than trained again, since the
        rollback says the recent learning was unwanted. Items of an unfinished step never
        changed any weight, so they stay queued.
        """
        if self._step is not None:
            self._step.close()
            self._abandon_step(failed=False)
        self.journal.mark_dropped(self._trained_unpublished, "rolled_back")
        self.counters.items_dropped += len(self._trained_unpublished)
        self._trained_unpublished = []

    def _release(self, item: TrainingItem) -> None:
        if item.sample is not None:
            self.release_sample(item.sample)
            item.sample = None

    def status(self) -> dict:
        return {
            "paused": self.paused,
            "queue_depth": len(self.queue),
            "step_in_progress": self._step is not None,
            "trained_unpublished": len(self._trained_unpublished),
            **{k: v for k, v in self.counters.__dict__.items()},
        }
