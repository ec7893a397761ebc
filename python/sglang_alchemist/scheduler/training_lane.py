"""The training lane: queued feedback -> updates (``LearningCore``), slice by slice -> versions.

The lane belongs to the training thread (``scheduler/worker.py``), which calls
:meth:`TrainingLane.run` with a grant from the SLO controller; ``run`` advances the current
work one slice at a time while the grant lasts, sizing every slice with the controller's cost
model so that it fits the grant's longest slice. Work left unfinished continues at the next
grant: nothing is lost between serving batches.

The first work of a fresh server is the learner's preparation (``LearningCore.prepare``: the
guard's answers, the output anchor, the trunk's records of the rehearsal prompts), normally
loaded in a moment from the cache ``scripts/setup.sh`` filled; feedback that arrives meanwhile
is queued. Then each update takes the feedback waiting at the head of the queue, up to
``--alchemist-feedback-batch`` items with different prompts, and trains them together: a burst
of corrections is one update, not one after another.

When an update finishes:

- **accepted** by the publish gate: its state is handed to the publisher (a writer thread) as
  the next version every ``--alchemist-publish-every`` accepted updates - and when the queue
  runs dry, so no trained feedback waits for a version while the server is idle. The journal
  marks the feedback ``trained`` once the version is durable (``scheduler/publisher.py``);
- **rejected**: the weights are already back at the last accepted state; a batch of several
  items goes back to the queue to be trained one by one (so one bad correction does not take
  the others with it); a single item is journaled ``rejected`` with the gate's reason, and
  training goes on from there.

Either way each item's journal record gets what its update did: the optimizer steps, whether
the check found it learnt, why the update stopped.

Items are queued by the scheduler thread (``enqueue`` never waits for a slice); every other
change (rollback, debug gradients) takes :attr:`lock`, which the training thread holds only
during one slice.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from sglang_alchemist.feedback.journal import Journal
from sglang_alchemist.scheduler.controller import Grant, SloController
from sglang_alchemist.scheduler.publisher import Publisher, PublishJob
from sglang_alchemist.training.lane_core import LearningCore, UpdateOutcome
from sglang_alchemist.training.step import SliceInfo
from sglang_alchemist.training.trainer import TrainingItem

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 2
PUBLISH = "publish"
# A batch stops growing past this many rows (prompt + target tokens): a burst of short corrections
# trains together, a backlog of long exchanges does not make one step as long as all of them.
BATCH_ROWS = 1024


@dataclass
class LaneCounters:
    items_enqueued: int = 0
    items_dropped: int = 0
    updates_completed: int = 0
    updates_rejected: int = 0
    slices_run: int = 0
    busy_seconds: float = 0.0
    slice_kinds: dict = field(default_factory=dict)
    last_update: dict | None = None
    feedback_to_version_s: list = field(default_factory=list)  # enqueue -> version submitted, recent
    preparation_failures: int = 0
    items_learnt: int = 0  # checked feedback the check found learnt when its update stopped
    items_not_learnt: int = 0  # ... not learnt (the update hit --alchemist-passes or --alchemist-update-max-s)
    steps_per_update: list = field(default_factory=list)  # recent
    update_busy_s: list = field(default_factory=list)  # recent: training-thread seconds per update
    batch_sizes: list = field(default_factory=list)  # recent: feedback items per update

    def note(self, outcome) -> None:
        self.items_learnt += sum(1 for learnt in outcome.learnt if learnt)
        self.items_not_learnt += sum(1 for learnt in outcome.learnt if learnt is False)
        for series, value in ((self.steps_per_update, outcome.passes), (self.update_busy_s, outcome.busy_seconds),
                              (self.batch_sizes, len(outcome.items))):
            series.append(value)
            del series[:-100]


class _Planner:
    """Rows per slice from the controller's cost model, for the current grant's longest slice."""

    def __init__(self, controller: SloController) -> None:
        self.controller = controller
        self.max_slice_s = 0.05

    def rows(self, kind: str, layer: int, total: int, context: int) -> int:
        return self.controller.cost.rows_for(kind, self.max_slice_s, context, total)


class TrainingLane:
    def __init__(self, core: LearningCore, journal: Journal, publisher: Publisher, publish_every: int,
                 release_sample: Callable[[object], None]) -> None:
        self.core = core
        self.journal = journal
        self.publisher = publisher
        self.publish_every = publish_every
        self.release_sample = release_sample
        self.queue: deque[TrainingItem] = deque()
        self.paused = False
        self.counters = LaneCounters()
        self.lock = threading.RLock()  # held by the training thread during one slice
        self._known: set[str] = set()
        self._known_lock = threading.Lock()
        self._update: Generator[SliceInfo, None, UpdateOutcome] | None = None
        self._items: list[TrainingItem] = []  # the current update's feedback
        self._preparing: Generator[SliceInfo, None, None] | None = None
        self.batch_size = max(1, getattr(core.config, "feedback_batch", 1))
        self._accepted: list[UpdateOutcome] = []  # accepted updates not yet handed to the publisher
        self.wake = threading.Event()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.cluster = None  # replicas: ``cluster/lockstep.py`` runs the updates in lockstep rounds

    # --- jobs: control operations that must run in the training thread ------------------------------

    def submit_job(self, job: Callable[[], None]) -> None:
        """Run ``job`` in the training thread before its next slice (it sends its own reply)."""
        self._jobs.put(job)
        self.wake.set()

    def run_jobs(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            with self.lock:
                job()

    # --- queue (scheduler thread) ---------------------------------------------------------------

    def enqueue(self, item: TrainingItem) -> bool:
        """Queue an item; False if it was already known. Never waits for the training thread."""
        with self._known_lock:
            if item.feedback_id in self._known:
                return False
            self._known.add(item.feedback_id)
        self.queue.append(item)
        self.counters.items_enqueued += 1
        self.wake.set()
        return True

    def knows(self, feedback_id: str) -> bool:
        with self._known_lock:
            return feedback_id in self._known

    def has_work(self) -> bool:
        if self.cluster is not None:
            return not self.paused and self.cluster.has_work()
        return not self.paused and (self._update is not None or bool(self.queue) or bool(self._accepted)
                                    or not self.core.ready)

    @property
    def step_in_progress(self) -> bool:
        return self._update is not None

    # --- running (training thread) --------------------------------------------------------------

    def run(self, grant: Grant, controller: SloController) -> int:
        """Run slices while ``grant`` lasts and the controller still allows it; returns slices run."""
        planner = _Planner(controller)
        planner.max_slice_s = grant.max_slice_s
        deadline = time.monotonic() + grant.budget_s
        slices = 0
        while not self.paused and time.monotonic() < deadline and controller.still_granted(grant):
            started = time.perf_counter()
            with self.lock:
                info = self._next_slice(planner)
            if info is None:
                break
            elapsed = time.perf_counter() - started
            controller.observe_slice(grant, info.kind, info.rows, info.context, elapsed)
            self.counters.slices_run += 1
            self.counters.busy_seconds += elapsed
            self.counters.slice_kinds[info.kind] = self.counters.slice_kinds.get(info.kind, 0) + 1
            slices += 1
        return slices

    def _next_slice(self, planner) -> SliceInfo | None:
        if self.cluster is not None:
            return self.cluster.next_slice(planner)
        if not self.core.ready:
            return self._prepare_slice(planner)
        if self._update is None:
            if self._accepted and (not self.queue or len(self._accepted) >= self.publish_every):
                return self._publish()
            if not self.queue or self.publisher.full:
                return None
            items, dropped = self._take_batch()
            if not items:
                return SliceInfo("drop", -1, dropped)
            self._items = items
            self._update = self.core.update(items, planner)
        try:
            return next(self._update)
        except StopIteration as finished:
            self._finish(finished.value)
            return SliceInfo("update_done", -1, 0)
        except Exception:
            logger.exception("sglang_alchemist: a training update failed; its feedback is retried")
            self._abandon(failed=True)
            return SliceInfo("update_failed", -1, 0)

    def _prepare_slice(self, planner) -> SliceInfo:
        """One slice of the learner's preparation (before the first update; see the module doc)."""
        if self._preparing is None:
            self._preparing = self.core.prepare()
        try:
            return next(self._preparing)
        except StopIteration:
            self._preparing = None
            logger.info("sglang_alchemist: the learner is ready (guard answers, anchor, trunk records)")
            return SliceInfo("prepared", -1, 0)
        except Exception:
            self._preparing = None
            self.counters.preparation_failures += 1
            logger.exception("sglang_alchemist: preparing the learner failed; retrying")
            return SliceInfo("prepare_failed", -1, 0)

    def _take_batch(self) -> tuple[list[TrainingItem], int]:
        """The next update's feedback: the head of the queue, up to ``batch_size`` items with different
        prompts (a later answer to the same prompt waits for the next update: the latest one wins) and
        ``BATCH_ROWS`` rows between them; an item that was rejected in a batch trains alone. Returns
        the items and how many were dropped."""
        items: list[TrainingItem] = []
        prompts: set[tuple[int, ...]] = set()
        dropped, rows = 0, 0
        while self.queue and len(items) < self.batch_size:
            item = self.queue[0]
            size = len(item.prompt_ids) + len(item.target_ids)
            if items and (item.alone or items[0].alone or tuple(item.prompt_ids) in prompts
                          or rows + size > BATCH_ROWS):
                break
            self.queue.popleft()
            reason = self._unusable(item)
            if reason is not None:
                self._drop(item, reason)
                dropped += 1
                continue
            items.append(item)
            prompts.add(tuple(item.prompt_ids))
            rows += size
        return items, dropped

    def _unusable(self, item: TrainingItem) -> str | None:
        if not item.target_ids:
            return "empty_target"
        if self.core.trainer.too_long(item):
            return "too_long"
        return None

    def _drop(self, item: TrainingItem, reason: str) -> None:
        self.journal.mark_dropped([item.feedback_id], reason)
        self.counters.items_dropped += 1
        self._release(item)

    def _finish(self, outcome: UpdateOutcome) -> None:
        items = outcome.items
        self._update, self._items = None, []
        for item in items:
            self._release(item)
        self.counters.updates_completed += 1
        self.counters.note(outcome)
        self.counters.last_update = outcome.public()
        self.note_in_journal(outcome)
        if outcome.accepted:
            self._accepted.append(outcome)
            return
        self.counters.updates_rejected += 1
        reason = outcome.gate.reason if outcome.gate else "gate"
        if len(items) > 1:  # one item may be the cause: each trains alone, in its turn
            for item in reversed(items):
                item.alone = True
                self.queue.appendleft(item)
            logger.warning("sglang_alchemist: a batch of %d feedback items was not published (%s); "
                           "each is trained alone", len(items), reason)
            return
        self.journal.mark_rejected([items[0].feedback_id], reason)
        logger.warning("sglang_alchemist: feedback %s not published: %s", items[0].feedback_id, reason)

    def note_in_journal(self, outcome: UpdateOutcome) -> None:
        """What the update did, on each of its feedback's records (steps, learnt, why it stopped, the
        gate's probes). Informational: a full disk must not lose the update, so a failure is logged."""
        try:
            self.journal.note_updates([(item.feedback_id, outcome.passes, learnt, outcome.stop_reason,
                                        outcome.gate_probes)
                                       for item, learnt in zip(outcome.items, outcome.learnt, strict=True)])
        except Exception as error:  # noqa: BLE001 - storage failures of any kind are logged the same way
            logger.warning("sglang_alchemist: could not note an update in the journal: %s", error)

    def _publish(self) -> SliceInfo:
        accepted, self._accepted = self._accepted, []
        snapshot = self.core.good
        items = [item for outcome in accepted for item in outcome.items]
        self.publisher.submit(PublishJob(
            snapshot=snapshot, feedback_ids=[item.feedback_id for item in items], samples=len(items),
            tokens=sum(len(item.target_ids) for item in items),
            recent_loss=accepted[-1].losses[-1] if accepted[-1].losses else None,
        ))
        now = time.monotonic()
        waits = self.counters.feedback_to_version_s
        waits += [now - item.enqueued_at for item in items]
        del waits[:-100]
        return SliceInfo(PUBLISH, -1, len(items))

    def _abandon(self, failed: bool) -> None:
        """Put an unfinished update's items back (they are retried), restoring the last accepted weights."""
        items = self._items
        if self._update is not None:
            self._update.close()
        self._update, self._items = None, []
        self.core.trainer.restore(self.core.good)
        for item in reversed(items):
            item.attempts += int(failed)
            if item.attempts >= MAX_ATTEMPTS:
                self._drop(item, "training_error")
            else:
                self.queue.appendleft(item)

    def _release(self, item: TrainingItem) -> None:
        if item.sample is not None:
            self.release_sample(item.sample)
            item.sample = None

    # --- control (scheduler thread, under ``lock``) ------------------------------------------------

    def discard_unpublished(self) -> list[str]:
        """Before a rollback: stop the current update (its item stays queued) and forget accepted
        updates not yet published (journaled as dropped, ``rolled_back``: the rollback says the
        recent learning was unwanted). Returns the dropped feedback ids."""
        with self.lock:
            if self._update is not None:
                self._abandon(failed=False)
            dropped = [item.feedback_id for outcome in self._accepted for item in outcome.items]
            self._accepted = []
            self.journal.mark_dropped(dropped, "rolled_back")
            self.counters.items_dropped += len(dropped)
            return dropped

    def status(self) -> dict:
        waits = self.counters.feedback_to_version_s
        return {
            "paused": self.paused,
            "queue_depth": len(self.queue),
            "step_in_progress": self._update is not None or (self.cluster is not None and self.cluster.in_round),
            "trained_unpublished": len(self._accepted) + self.publisher.pending,
            "items_enqueued": self.counters.items_enqueued,
            "items_dropped": self.counters.items_dropped,
            "updates_completed": self.counters.updates_completed,
            "updates_rejected": self.counters.updates_rejected,
            "slices_run": self.counters.slices_run,
            "busy_seconds": self.counters.busy_seconds,
            "slice_kinds": dict(self.counters.slice_kinds),
            "last_update": self.counters.last_update,
            "mean_feedback_to_version_s": sum(waits) / len(waits) if waits else None,
            "learner": self.core.preparation(),
            "items_learnt": self.counters.items_learnt,
            "items_not_learnt": self.counters.items_not_learnt,
            "median_steps_per_update": _median(self.counters.steps_per_update),
            "median_update_busy_s": _median(self.counters.update_busy_s),
            "mean_feedback_per_update": (sum(self.counters.batch_sizes) / len(self.counters.batch_sizes)
                                         if self.counters.batch_sizes else None),
            "replay_memory": len(self.core.memory),
            "gate": self.core.gate_counters(),
            "publisher": self.publisher.status(),
            **({"cluster": self.cluster.status()} if self.cluster is not None else {}),
        }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
