"""Everything sglang_alchemist keeps in the scheduler process, wired together, and the loop's hooks.

``AlchemistScheduler`` (the SGLang subclass) owns one ``AlchemistRuntime`` and calls its hooks
from a handful of overrides. The components:

- recording: ``RecordingPolicy`` -> ``PrefillRecorder`` (capture hooks) -> ``ActivationStore``;
- served samples waiting for feedback: ``SampleTable``;
- learning: ``LearningCore`` (trainer, recipe, guard, gate) driven by the ``TrainingLane`` in
  the training thread (``TrainingWorker``) within what the ``SloController`` grants;
- the ``Publisher`` thread makes versions durable, marks the journal, and tells the HTTP
  process (``version_published``), which loads each version into SGLang's LoRA manager;
- control and debug operations live in ``control_ops.py`` / ``debug_ops.py``.

Recording and training must never take serving down: an unexpected error in a hook is logged
and counted, the forward goes on unrecorded, a failed update is retried or dropped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sglang_alchemist.config import AlchemistConfig, first_adapted_layer
from sglang_alchemist.feedback.journal import Journal, journal_path
from sglang_alchemist.ipc import EVENT_RID, AlchemistControlReqOutput
from sglang_alchemist.memory.policy import RecordingPolicy
from sglang_alchemist.memory.recorder import PrefillRecorder
from sglang_alchemist.memory.records import layer_widths
from sglang_alchemist.memory.samples import SampleTable
from sglang_alchemist.memory.store import ActivationStore
from sglang_alchemist.scheduler import sglang_view
from sglang_alchemist.scheduler.controller import SloController
from sglang_alchemist.scheduler.cost_model import SliceCostModel, attention_context
from sglang_alchemist.scheduler.publisher import Publisher
from sglang_alchemist.scheduler.training_lane import TrainingLane
from sglang_alchemist.scheduler.worker import TrainingWorker
from sglang_alchemist.training.guard import GuardSet, load_user_probes
from sglang_alchemist.training.hedging import layer_forward_flops, measure_rates
from sglang_alchemist.training.lane_core import LearningCore
from sglang_alchemist.training.learner_cache import guard_cache_path, model_fingerprint
from sglang_alchemist.training.model_spec import FrozenModel
from sglang_alchemist.training.sglang_weights import frozen_model_from_sglang
from sglang_alchemist.training.trainer import TrainingItem
from sglang_alchemist.training.versions import VersionHistory, VersionInfo, adapter_name

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
HOUSEKEEPING_INTERVAL_S = 1.0
RECONCILE_AFTER_S = 30.0  # a journaled record the trainer never heard of, older than this, is queued


def _config_on_disk(view: sglang_view.RunnerView):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(view.model_path, trust_remote_code=view.trust_remote_code)


class AlchemistRuntime:
    def __init__(self, config: AlchemistConfig, scheduler, port_args) -> None:
        self.config = config
        self.scheduler = scheduler
        view = sglang_view.runner_view(scheduler)
        self.device = view.device
        self.model_path = view.model_path
        self.frozen: FrozenModel = frozen_model_from_sglang(view.model, view.hf_config, _config_on_disk(view))
        geometry = self.frozen.geometry
        self.dtype = self.frozen.dtype
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.internal_errors = 0
        self.version_of = sglang_view.AdapterVersions(scheduler)
        self.events = sglang_view.EventSender(port_args)  # used by the publisher thread only
        self.worker_events = sglang_view.EventSender(port_args)  # used by the training thread only

        # recording: every tensor of the layers training adapts, keys and values of the trunk below
        self.store = ActivationStore(
            device=self.device, device_budget_bytes=int(config.activation_device_mb * MIB),
            host_budget_bytes=int(config.activation_host_mb * MIB), kv_slots=view.kv_slots,
            widths=layer_widths(geometry), num_layers=geometry.num_layers, dtype=self.dtype,
            first_layer=first_adapted_layer(config.lora_layers, geometry.num_layers),
        )
        self.samples = SampleTable(self.store, ttl_s=config.feedback_ttl_s)
        self.recorder = PrefillRecorder(
            view.model, geometry, self.store, self.samples,
            RecordingPolicy(config.record, config.record_sample_rate), view.req_to_token, self.dtype,
        )

        # learning
        self.journal = Journal(journal_path(self.state_dir))
        self.history = VersionHistory.load(self.state_dir / "adapters", config.keep_checkpoints)
        self._fall_back_to_a_loadable_version()
        self.recorder.replayable = self._replayable
        tokenizer = view.tokenizer
        guard = _guard_set(tokenizer, config) if tokenizer is not None else None
        stop_ids = {tokenizer.eos_token_id} if tokenizer is not None and tokenizer.eos_token_id is not None else set()
        fingerprint = model_fingerprint(view.model_path, str(self.dtype).replace("torch.", ""), geometry.num_layers)
        self.core = LearningCore(
            self.frozen, config, guard, stop_ids, self.state_dir, view.context_len,
            guard_cache=guard_cache_path(fingerprint, guard, self.state_dir) if guard is not None else None,
            history=self.history,
        )
        self.trainer = self.core.trainer
        measure_rates(self.device, self.dtype, self.trainer.hedge)
        # The training and publisher threads write through a connection of their own: one of them
        # waiting out another process's lock (SQLite's busy timeout) never holds up this thread's reads.
        writer_journal = Journal(journal_path(self.state_dir))
        self.publisher = Publisher(self.history, writer_journal, self.trainer.adapter.peft_config,
                                   self._announce_version, note_weights=self.trainer.note_published)
        self.lane = TrainingLane(self.core, writer_journal, self.publisher, config.publish_every,
                                 release_sample=self.samples.release_sample)
        cost = SliceCostModel(
            attention_context=attention_context(geometry),
            seed_rate=3 * layer_forward_flops(geometry, 1) / self.trainer.hedge.compute_flops_per_s,
        )
        self.controller = SloController(config.tpot_slo_ms / 1000, config.ttft_slo_ms / 1000, config.train_share,
                                        cost)
        if config.cluster_size > 1:  # replicas: lockstep rounds, gradients averaged (cluster/lockstep.py)
            from sglang_alchemist.cluster.lockstep import attach_cluster

            attach_cluster(self)
        restored = self._restore_from_journal()
        self.worker = TrainingWorker(self.lane, self.controller, self.device)
        self.publisher.start()
        self.worker.start()
        self._last_housekeeping = time.monotonic()
        self._armed = False
        self._batch_started = 0.0
        logger.info(
            "sglang_alchemist: serving adapter version %d; %d queued feedback item(s) restored from the journal; "
            "recording %s; state in %s", self.history.current, restored, config.record, self.state_dir,
        )

    # --- start-up ------------------------------------------------------------------------------

    def _fall_back_to_a_loadable_version(self) -> None:
        """If the current version's checkpoint is missing or damaged, go back along its lineage.

        Feedback trained into the versions left behind is queued again (at-least-once training).
        """
        from sglang_alchemist.training.lora import LoraAdapter

        for version in self.history.lineage():
            if version == 0:
                break
            try:
                LoraAdapter.read_peft(self.history.checkpoint_dir(version))
                break
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped the same way
                logger.warning("sglang_alchemist: checkpoint %s is unreadable (%s); falling back to its parent",
                               self.history.checkpoint_dir(version) / "adapter_model.safetensors", error)
        else:
            version = 0
        if version != self.history.current:
            requeued = self.journal.requeue_trained_after(version)
            logger.warning("sglang_alchemist: serving version %d instead of %d; %d feedback item(s) queued again",
                           version, self.history.current, requeued)
            self.history.set_current(version)

    def _restore_from_journal(self) -> int:
        """After a restart: queued feedback trains again (by computing its rows); trained feedback
        on the current lineage joins experience replay."""
        lineage = set(self.history.lineage())
        for record in self.journal.trained():
            if record.trained_version in lineage:
                self.core.remember(record.feedback_id, record.prompt_ids, record.target_ids, record.objective,
                                   record.weight)
        count = 0
        for record in self.journal.queued():
            count += self.lane.enqueue(_item_from_record(record))
        return count

    # --- versions --------------------------------------------------------------------------

    def _announce_version(self, info: VersionInfo) -> None:
        """Publisher thread: the version is durable; the HTTP process loads it and routes to it."""
        logger.info("sglang_alchemist: published adapter version %d (loss %s)", info.version, info.recent_loss)
        self.events.send(AlchemistControlReqOutput(rid=EVENT_RID, ok=True, payload={
            "event": "version_published", **self.version_payload(info.version)}))

    def _replayable(self, version: int) -> bool:
        """Rows recorded with ``version`` could serve the trainer: always when a frozen trunk exists (its
        layers are every version's), else only when exact enough for the adapted layers."""
        if self.trainer.trunk.enabled:
            return True
        staleness = self.trainer.record_staleness(version)
        return staleness is not None and staleness <= self.config.max_staleness

    def version_payload(self, version: int) -> dict:
        return {"version": version, "adapter": adapter_name(version),
                "path": str(self.history.checkpoint_dir(version)) if version else None,
                "lineage": self.history.lineage(version)}  # whose feedback the version's scope covers

    # --- hooks called by AlchemistScheduler (scheduler thread) ---------------------------------

    def before_forward(self, batch) -> None:
        self._batch_started = time.monotonic()
        if sglang_view.is_extend(batch):
            self.controller.prefill_running = True  # the training thread holds until it is done
        try:
            self._armed = sglang_view.is_extend(batch) and self.recorder.before_forward(
                sglang_view.extend_requests(batch, self.version_of))
        except Exception:
            self._internal_error("planning a recorded forward")
            self.recorder.abandon_forward()
            self._armed = False

    def after_forward(self, failed: bool = False) -> None:
        if not self._armed:
            return
        self._armed = False
        try:
            if failed:
                self.recorder.abandon_forward()
            else:
                self.recorder.after_forward()
        except Exception:
            self._internal_error("storing recorded activations")

    def after_requests_received(self) -> None:
        running, waiting = sglang_view.queue_lengths(self.scheduler)
        self.controller.note_queues(running, waiting)

    def after_batch_result(self, batch) -> None:
        now = time.monotonic()
        self.controller.on_batch(sglang_view.is_decode(batch), self._batch_started, now - self._batch_started)
        try:
            if sglang_view.is_extend(batch):
                for _, wait in sglang_view.first_token_waits(batch, time.perf_counter()):
                    self.controller.on_first_token(wait)  # SGLang's timestamps are perf_counter values
            for finished in sglang_view.newly_finished(batch, self.version_of):
                self._on_request_finished(finished)
        except Exception:
            self._internal_error("registering finished requests")
        self.controller.prefill_running = False
        running, waiting = sglang_view.queue_lengths(self.scheduler)
        self.controller.note_queues(running, waiting)
        self.housekeeping()

    def on_idle(self) -> None:
        running, waiting = sglang_view.queue_lengths(self.scheduler)
        if running == 0:
            self.controller.on_idle()
        self.controller.note_queues(running, waiting)
        self.housekeeping()

    def housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_housekeeping < HOUSEKEEPING_INTERVAL_S:
            return
        self._last_housekeeping = now
        try:
            self.samples.expire(now)
            self._reconcile_journal()
        except Exception:
            self._internal_error("housekeeping")

    def _reconcile_journal(self) -> None:
        """Queue journaled feedback the trainer never received (the enqueue after the journal
        commit failed, e.g. the scheduler was busy): nothing acknowledged waits for a restart."""
        cutoff = time.time() - RECONCILE_AFTER_S
        for record in self.journal.queued(created_before=cutoff):
            if not self.lane.knows(record.feedback_id):
                self.lane.enqueue(_item_from_record(record))

    def _on_request_finished(self, finished: sglang_view.FinishedRequest) -> None:
        if finished.finish_type == "abort":
            self.samples.abort(finished.rid)
            return
        self.samples.finish(finished.rid, finished.prompt_ids, finished.output_ids, finished.finish_type,
                            finished.adapter_version)

    def _internal_error(self, what: str) -> None:
        self.internal_errors += 1
        logger.exception("sglang_alchemist: error while %s (serving continues)", what)

    def shutdown(self) -> None:
        self.worker.stop()
        self.publisher.stop()

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict:
        from sglang_alchemist.memory.records import bytes_per_token_per_layer

        geometry = self.frozen.geometry
        return {
            "model": {
                "architecture": geometry.architecture,
                "path": self.model_path,
                "layers": geometry.num_layers,
                "dtype": str(self.dtype).replace("torch.", ""),
                "recorded_bytes_per_token_per_layer": bytes_per_token_per_layer(geometry, self.dtype),
                "first_adapted_layer": self.store.first_layer,
                "recorded_bytes_per_token": self.recorder.bytes_per_token,
            },
            "recording": {"policy": self.recorder.policy.mode, "sample_rate": self.recorder.policy.sample_rate,
                          **self.recorder.status()},
            "store": self.store.status(),
            "samples": self.samples.status(),
            "training": {**self.trainer.status(), **self.lane.status(), "thread_alive": self.worker.alive,
                         "thread_errors": self.worker.errors,
                         "thread_intra_op_threads": self.worker.threads},
            "versions": {"current": self.history.current, "latest": self.history.latest},
            "scheduler": self.controller.status(),
            "journal": self.journal.counts(),
            "internal_errors": self.internal_errors,
        }


def _item_from_record(record) -> TrainingItem:
    return TrainingItem(
        feedback_id=record.feedback_id, prompt_ids=record.prompt_ids, target_ids=record.target_ids,
        objective=record.objective, weight=record.weight, completion_id=record.completion_id, kind=record.kind,
    )


def _guard_set(tokenizer, config: AlchemistConfig) -> GuardSet:
    def chat_ids(messages):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    user = load_user_probes(config.guard_file) if config.guard_file else []
    return GuardSet(chat_ids, encode, tokenizer.decode, user_probes=user,
                    special_tokens=list(getattr(tokenizer, "all_special_tokens", []) or []))
