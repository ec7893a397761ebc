"""Replicas train one adapter lineage in lockstep rounds (the training lane's cluster mode).

With ``--alchemist-cluster-size`` > 1 the training lane (``scheduler/training_lane.py``) hands
every slice to :class:`ClusterLane`, which runs **rounds**. All replicas run every round, and
every decision that could differ between them is agreed by a collective first:

1. *Gather.* Each replica takes its next queued feedback (or none) and all-gathers a short
   description (token ids, objective, weight) plus its queue length. Nobody has anything: the
   round ends there (an idle round, about one a second).
2. *Steps.* A replica with an item runs the learning recipe for it (``training/recipe.py``:
   the feedback with its own recorded activations, replayed earlier feedback, rehearsal) on its
   own; before each optimizer step the replicas agree whether anyone still has a batch (each
   update may stop early on its own loss); if so every replica steps: each computes the
   gradients of its own batch (none: weight 0), ``GradientSync`` averages them over the
   replicas, and every replica applies the same AdamW step. The adapters stay identical.
3. *Gate.* Each replica checks its own feedback's gate probes; a repair round runs while any
   replica needs one (the others contribute zero gradients); the round is **accepted only if
   every replica's gate passes** (one shared set of weights cannot keep one replica's update and
   drop another's), else every replica goes back to the last accepted state and journals its
   own item ``rejected``.
4. *Publish.* The accepted-round counter is the same everywhere, so is the verdict "publish
   now" (every ``--alchemist-publish-every`` accepted rounds, or when every replica's queue is
   empty): every replica checkpoints the same weights as the same version number N, marks its
   own feedback trained in it, and its HTTP process serves N.

Every accepted round's items join every replica's experience-replay memory (the lineage's
feedback, not only one replica's).

**Failures.** A collective that fails (a peer was killed: gloo sees its socket close; or one
ran past ``--alchemist-cluster-timeout-s``) abandons the round: the weights go back to the last
accepted state, the item goes back to the head of the queue, and the replica re-joins the
cluster (``sync.py``: a new generation once every rank is there again; serving and feedback
intake go on meanwhile, training waits for the restarted peer). After every (re-)formation the
replicas **catch up** before the first round: the replica with the newest version (lowest rank
on a tie) broadcasts its accepted state and the checkpoint of its current version; a replica
behind writes that checkpoint as the same version number and serves it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass

import torch

from sglang_alchemist.cluster.sync import ClusterBroken, GradientSync
from sglang_alchemist.scheduler.publisher import PublishJob
from sglang_alchemist.training.durable import write_directory_atomically
from sglang_alchemist.training.lane_core import REPAIR_PASSES, UpdateOutcome
from sglang_alchemist.training.recipe import FeedbackUpdate, Remembered
from sglang_alchemist.training.step import SliceInfo
from sglang_alchemist.training.trainer import TrainingItem
from sglang_alchemist.training.versions import VersionInfo

logger = logging.getLogger(__name__)

IDLE_ROUND_S = 0.5  # between two idle rounds (nobody had feedback)
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.pt")


def attach_cluster(runtime) -> ClusterLane:
    """Put the runtime's training lane and trainer in cluster mode (called by ``AlchemistRuntime``)."""
    config = runtime.config
    sync = GradientSync(config.cluster_rank, config.cluster_size, config.cluster_addr, config.cluster_timeout_s)

    def announce(info: VersionInfo) -> None:  # a caught-up version (training thread: its own sender)
        from sglang_alchemist.ipc import EVENT_RID, AlchemistControlReqOutput

        runtime.worker_events.send(AlchemistControlReqOutput(rid=EVENT_RID, ok=True, payload={
            "event": "version_published", **runtime.version_payload(info.version)}))

    cluster = ClusterLane(runtime.lane, sync, announce=announce)
    runtime.lane.cluster = cluster
    runtime.trainer.sync = sync
    runtime.cluster = cluster
    cluster.start()
    return cluster


@dataclass
class ClusterCounters:
    rounds: int = 0
    idle_rounds: int = 0
    rounds_accepted: int = 0
    rounds_rejected: int = 0
    abandoned_rounds: int = 0
    catch_ups: int = 0
    versions_caught_up: int = 0
    divergences_repaired: int = 0


def describe(item: TrainingItem | None) -> dict | None:
    if item is None:
        return None
    return {"feedback_id": item.feedback_id, "prompt_ids": list(item.prompt_ids),
            "target_ids": list(item.target_ids), "objective": item.objective, "weight": item.weight,
            "kind": item.kind}


def adapter_digest(state: dict) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ClusterLane:
    """The lane's cluster mode: ``has_work`` and ``next_slice`` replace the single-server ones."""

    def __init__(self, lane, sync: GradientSync, announce=None) -> None:
        self.lane = lane
        self.core = lane.core
        self.sync = sync
        self.announce = announce
        self.counters = ClusterCounters()
        self.pending_rounds = 0  # accepted rounds not yet published (identical on every replica)
        self._own_accepted: list[UpdateOutcome] = []
        self._round: Generator[SliceInfo, None, None] | None = None
        self._item: TrainingItem | None = None
        self._idle_until = 0.0
        self._needs_catch_up = True
        self._joining: threading.Thread | None = None

    # --- membership -------------------------------------------------------------------------------

    def start(self) -> None:
        self._join_in_background()

    def _join_in_background(self) -> None:
        if self._joining is not None and self._joining.is_alive():
            return

        def join() -> None:
            while True:
                try:
                    self.sync.form()
                    self._needs_catch_up = True
                    self.lane.wake.set()
                    return
                except Exception as error:  # noqa: BLE001 - keep trying: serving goes on meanwhile
                    logger.warning("sglang_alchemist: joining the cluster failed (%s); retrying", error)
                    time.sleep(2.0)

        self._joining = threading.Thread(target=join, name="alchemist-cluster-join", daemon=True)
        self._joining.start()

    # --- the lane's hooks (training thread) ---------------------------------------------------------

    @property
    def in_round(self) -> bool:
        return self._round is not None and self._item is not None

    def has_work(self) -> bool:
        if not self.sync.ready:
            return False
        return self._round is not None or self._needs_catch_up or bool(self.lane.queue) \
            or time.monotonic() >= self._idle_until

    def next_slice(self, planner) -> SliceInfo | None:
        if not self.sync.ready:
            return None
        try:
            if self._needs_catch_up:
                self._catch_up()
                self._needs_catch_up = False
                return SliceInfo("cluster_catch_up", -1, 0)
            if self._round is None:
                if not self.has_work():
                    return None
                if self.sync.generation_moved():  # a peer restarted: re-form before the next round
                    raise ClusterBroken("the cluster re-forms (a replica joined)")
                self._item = self._next_item()
                self._round = self._run_round(self._item, planner)
            try:
                return next(self._round)
            except StopIteration:
                self._round, self._item = None, None
                return SliceInfo("cluster_round_done", -1, 0)
        except ClusterBroken as error:
            logger.warning("sglang_alchemist: cluster round abandoned (%s); re-joining", error)
            self._abandon(failed=False)
            self.sync.broken(error)
            self._join_in_background()
            return None
        except Exception as error:
            logger.exception("sglang_alchemist: a cluster round failed; its feedback is retried")
            self._abandon(failed=True)
            self.sync.broken(error)  # the peers must not wait for a step that will not come
            self._join_in_background()
            return SliceInfo("update_failed", -1, 0)

    def _next_item(self) -> TrainingItem | None:
        lane = self.lane
        while lane.queue and not lane.publisher.full:
            item = lane.queue.popleft()
            reason = lane._unusable(item)
            if reason is None:
                return item
            lane._drop(item, reason)
        return None

    def _abandon(self, failed: bool) -> None:
        if self._round is not None:
            self._round.close()
        self._round = None
        item, self._item = self._item, None
        self.counters.abandoned_rounds += 1
        self.core.trainer.restore(self.core.good)
        self._needs_catch_up = True
        if item is None:
            return
        item.attempts += int(failed)
        if item.attempts >= 2:
            self.lane._drop(item, "training_error")
        else:
            self.lane.queue.appendleft(item)

    # --- catch-up after (re-)forming -------------------------------------------------------------

    def _catch_up(self) -> None:
        """Every replica leaves with the source's accepted state and its current version number."""
        lane, core, sync = self.lane, self.core, self.sync
        lane.publisher.wait_idle(60.0)
        history = core.history
        states = sync.all_gather_object({"current": history.current, "pending": self.pending_rounds})
        source = max(range(sync.size), key=lambda r: (states[r]["current"], -r))
        payload = None
        if sync.rank == source:
            files = None
            if history.current:
                directory = history.checkpoint_dir(history.current)
                files = {name: (directory / name).read_bytes() for name in CHECKPOINT_FILES
                         if (directory / name).exists()}
                info = history.versions[history.current]
            payload = {"current": history.current, "files": files, "good": core.good,
                       "pending": self.pending_rounds, "info": info if history.current else None}
        payload = sync.broadcast_object(payload, source)
        self.counters.catch_ups += 1
        core.good = payload["good"]
        core.trainer.restore(core.good)
        self.pending_rounds = payload["pending"]
        version = payload["current"]
        if version != history.current and version > 0 and payload["files"]:
            directory = history.checkpoint_dir(version)
            write_directory_atomically(directory, payload["files"])
            source_info: VersionInfo = payload["info"]
            info = VersionInfo(version=version, parent=history.current, created_at=time.time(),
                               optimizer_steps=source_info.optimizer_steps, samples_trained=0, tokens_trained=0,
                               recent_loss=source_info.recent_loss)
            history.add(info)
            self.counters.versions_caught_up += 1
            logger.info("sglang_alchemist: cluster rank %d caught up to version %d from rank %d", sync.rank,
                        version, source)
            if self.announce is not None:
                self.announce(info)

    # --- one round ---------------------------------------------------------------------------------

    def _run_round(self, item: TrainingItem | None, planner) -> Generator[SliceInfo, None, None]:
        lane, core, sync, trainer = self.lane, self.core, self.sync, self.core.trainer
        started = time.monotonic()
        descs = sync.all_gather_object({"item": describe(item), "queue": len(lane.queue)})
        self.counters.rounds += 1
        yield SliceInfo("cluster_gather", -1, 0)
        round_items = [d["item"] for d in descs if d["item"] is not None]
        if round_items:
            update = None
            probes = []
            words = frozenset()
            if item is not None:
                words = core.guard.words_of(item.prompt_ids) if core.guard is not None else frozenset()
                update = FeedbackUpdate([item], core.recipe, core.memory, core.guard, words, core.rng,
                                        core.max_update_s)
                probes = core._gate_probes(words)
                yield from core._ensure_answers([*update.rehearsal_prompts(), *probes])
            yield from core.prepare()  # every replica: the anchor and projection must be the same
            paths, gate, repairs = [], None, 0
            while True:
                while True:
                    batch = update.next_batch() if update is not None else None
                    if not sync.any(batch is not None):
                        break
                    if batch is not None:
                        yield from core.one_step(update, batch, planner, paths)
                    else:  # this replica has nothing left to train: it takes part in the average only
                        yield from trainer.step([], [], planner, sync_weight=0.0)
                checking = bool(probes) and core.gate_max_regressions >= 0
                if checking:
                    gate = yield from core._check(probes)
                    gate.repairs = repairs
                mend = core.to_repair(gate, [item], repairs) if checking and item is not None else []
                if not sync.any(bool(mend)):
                    break
                if mend:
                    update.repair(mend, REPAIR_PASSES)
                    repairs += 1
            own_passed = gate is None or gate.passed
            accepted = sync.all(own_passed)
            if accepted:
                core.good = trainer.snapshot()
                self.counters.rounds_accepted += 1
                self.pending_rounds += 1
                for desc in round_items:
                    own = item is not None and desc["feedback_id"] == item.feedback_id
                    desc_words = words if own else (
                        core.guard.words_of(desc["prompt_ids"]) if core.guard is not None else frozenset())
                    if desc["feedback_id"] is not None:
                        core.memory.add(Remembered(desc["feedback_id"], desc["prompt_ids"], desc["target_ids"],
                                                   desc["objective"], desc["weight"], desc_words))
            else:
                trainer.restore(core.good)
                self.counters.rounds_rejected += 1
                core.gate.rejections += 1
            if item is not None:
                outcome = UpdateOutcome([item], accepted, update.passes_done, update.losses, gate,
                                        time.monotonic() - started, paths, learnt=[update.item_learnt(0)],
                                        margins=[update.margins.get(0)], stop_reason=update.stop_reason,
                                        busy_seconds=update.spent_s)
                self._finish_own(outcome, own_passed)
            self._item = None
        else:
            self.counters.idle_rounds += 1
            self._idle_until = time.monotonic() + IDLE_ROUND_S
        everyone_idle = all(d["queue"] == 0 for d in descs)
        if self.pending_rounds and (self.pending_rounds >= lane.publish_every or everyone_idle):
            yield from self._publish()

    def _finish_own(self, outcome: UpdateOutcome, own_passed: bool) -> None:
        lane, item = self.lane, outcome.item
        lane._release(item)
        lane.counters.updates_completed += 1
        lane.counters.note(outcome)
        lane.counters.last_update = outcome.public()
        lane.note_in_journal(outcome)
        if outcome.accepted:
            self._own_accepted.append(outcome)
            return
        lane.counters.updates_rejected += 1
        if not own_passed:
            reason = outcome.gate.reason if outcome.gate else "gate"
        else:
            reason = "another replica's update in the same cluster round regressed the publish gate"
        self.core.gate.last_rejection = {"feedback_id": item.feedback_id, "at": time.time(), "reason": reason}
        lane.journal.mark_rejected([item.feedback_id], reason)
        logger.warning("sglang_alchemist: feedback %s not published: %s", item.feedback_id, reason)

    def _publish(self) -> Generator[SliceInfo, None, None]:
        lane, core, sync = self.lane, self.core, self.sync
        # the weights are identical by construction; check it once per version, repair if not
        digests = sync.all_gather_object(adapter_digest(core.good.adapter))
        if len(set(digests)) > 1:
            logger.error("sglang_alchemist: cluster adapters diverged (%s); taking rank 0's", digests)
            core.good = sync.broadcast_object(core.good, 0)
            core.trainer.restore(core.good)
            self.counters.divergences_repaired += 1
        accepted, self._own_accepted = self._own_accepted, []
        items = [outcome.item for outcome in accepted]
        losses = [o.losses[-1] for o in accepted if o.losses]
        lane.publisher.submit(PublishJob(
            snapshot=core.good, feedback_ids=[item.feedback_id for item in items], samples=len(items),
            tokens=sum(len(item.target_ids) for item in items), recent_loss=losses[-1] if losses else None,
        ))
        self.pending_rounds = 0
        now = time.monotonic()
        waits = lane.counters.feedback_to_version_s
        waits += [now - item.enqueued_at for item in items]
        del waits[:-100]
        yield SliceInfo("publish", -1, len(items))

    def status(self) -> dict:
        c = self.counters
        return {**self.sync.status(), "rounds": c.rounds, "idle_rounds": c.idle_rounds,
                "rounds_accepted": c.rounds_accepted, "rounds_rejected": c.rounds_rejected,
                "abandoned_rounds": c.abandoned_rounds, "catch_ups": c.catch_ups,
                "versions_caught_up": c.versions_caught_up, "divergences_repaired": c.divergences_repaired,
                "pending_rounds": self.pending_rounds}
