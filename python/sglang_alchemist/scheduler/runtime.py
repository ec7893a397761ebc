"""Everything sglang_alchemist keeps in the scheduler process, wired together.

``AlchemistScheduler`` (the SGLang subclass) owns one ``AlchemistRuntime`` and calls it from
a handful of overrides; this class holds the components and the glue between them:

- recording: ``RecordingPolicy`` -> ``PrefillRecorder`` (capture hooks) -> ``ActivationStore``;
- served samples waiting for feedback: ``SampleTable``;
- training: ``Trainer`` (LoRA, optimizer, versions) driven by the ``TrainingLane`` within the
  time the ``SloController`` grants between serving batches;
- the feedback journal (state changes made here) and the control operations (``op_*``)
  answered over the control channel; ``version_published`` events go to the HTTP process,
  which loads each new adapter version into SGLang's LoRA manager and routes requests to it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from sglang_alchemist.config import AlchemistConfig
from sglang_alchemist.feedback.journal import Journal, journal_path
from sglang_alchemist.ipc import EVENT_RID, AlchemistControlReqOutput
from sglang_alchemist.memory.policy import RecordingPolicy
from sglang_alchemist.memory.recorder import PrefillRecorder
from sglang_alchemist.memory.records import LAYER_TENSORS, bytes_per_token_per_layer
from sglang_alchemist.memory.samples import SampleTable
from sglang_alchemist.memory.store import ActivationStore
from sglang_alchemist.scheduler.controller import SloController
from sglang_alchemist.scheduler.training_lane import TrainingLane
from sglang_alchemist.training.hedging import layer_forward_flops, measure_rates
from sglang_alchemist.training.model_spec import FrozenModel
from sglang_alchemist.training.sglang_weights import frozen_model_from_sglang
from sglang_alchemist.training.trainer import Trainer, TrainerSettings, TrainingItem
from sglang_alchemist.training.versions import ADAPTER_NAME_PREFIX, VersionHistory, VersionInfo, adapter_name

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
MAX_PENDING_ARRIVALS = 100_000
HOUSEKEEPING_INTERVAL_S = 1.0


class ControlError(Exception):
    """A control operation refused with an HTTP status the route passes on (e.g. 404)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


def adapter_version_from_name(name: str | None) -> int:
    """0 for the base model, N for our adapter ``alchemist-vN``, -1 for any other adapter."""
    if name is None:
        return 0
    if name.startswith(ADAPTER_NAME_PREFIX) and name[len(ADAPTER_NAME_PREFIX):].isdigit():
        return int(name[len(ADAPTER_NAME_PREFIX):])
    return -1


def _config_on_disk(model_config):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        model_config.model_path, trust_remote_code=getattr(model_config, "trust_remote_code", False)
    )


class AlchemistRuntime:
    def __init__(self, config: AlchemistConfig, scheduler) -> None:
        self.config = config
        self.scheduler = scheduler
        model_runner = scheduler.tp_worker.model_runner
        self.model_runner = model_runner
        self.device = torch.device(scheduler.device)
        model_config = model_runner.model_config
        self.frozen: FrozenModel = frozen_model_from_sglang(
            model_runner.model, model_config.hf_config, _config_on_disk(model_config)
        )
        geometry = self.frozen.geometry
        self.dtype = self.frozen.dtype
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.internal_errors = 0

        # recording
        kv_slots = int(model_runner.token_to_kv_pool.size) + int(getattr(model_runner, "page_size", 1) or 1) + 1
        self.store = ActivationStore(
            device=self.device,
            device_budget_bytes=int(config.activation_device_mb * MIB),
            host_budget_bytes=int(config.activation_host_mb * MIB),
            kv_slots=kv_slots,
        )
        self.samples = SampleTable(self.store, ttl_s=config.feedback_ttl_s)
        self.recorder = PrefillRecorder(
            model_runner.model, geometry, self.store, self.samples,
            RecordingPolicy(config.record, config.record_sample_rate),
            scheduler.req_to_token_pool.req_to_token, self.version_of, self.dtype,
        )

        # training
        self.history = VersionHistory.load(self.state_dir / "adapters", config.keep_checkpoints)
        self.trainer = Trainer(
            self.frozen, TrainerSettings.from_config(config), self.history, max_positions=model_config.context_len
        )
        measure_rates(self.device, self.dtype, self.trainer.hedge)
        self.journal = Journal(journal_path(self.state_dir))
        self.lane = TrainingLane(
            self.trainer, self.journal, config.batch_samples, config.publish_every,
            on_publish=self._announce_version, release_sample=self.samples.release_sample,
        )
        flops_per_token_layer = 3 * layer_forward_flops(geometry, 1)
        self.controller = SloController(
            tpot_slo_s=config.tpot_slo_ms / 1000, ttft_slo_s=config.ttft_slo_ms / 1000,
            train_share=config.train_share,
            seconds_per_token_layer=flops_per_token_layer / self.trainer.hedge.compute_flops_per_s,
        )
        restored = self._requeue_journal()
        self._last_housekeeping = time.monotonic()
        self._armed = False
        self._batch_started = 0.0
        self._training_since_ingest = 0.0  # slice seconds since the scheduler last looked for requests
        self._arrival_training_s: dict[str, float] = {}  # rid -> training that may have delayed it
        logger.info(
            "sglang_alchemist: serving adapter version %d; %d queued feedback item(s) restored from the journal",
            self.history.current, restored,
        )

    # --- adapter versions ------------------------------------------------------------------

    def version_of(self, lora_id: str | None) -> int:
        if lora_id is None:
            return 0
        manager = getattr(self.model_runner, "lora_manager", None)
        refs = getattr(manager, "lora_refs", {}) if manager is not None else {}
        ref = refs.get(lora_id)
        return -1 if ref is None else adapter_version_from_name(ref.lora_name)

    def _announce_version(self, info: VersionInfo) -> None:
        """Tell the HTTP process that a version is checkpointed: it loads it and routes to it."""
        logger.info("sglang_alchemist: published adapter version %d (loss %s)", info.version, info.recent_loss)
        self._send_event({"event": "version_published", **self._version_payload(info.version)})

    def _version_payload(self, version: int) -> dict[str, Any]:
        return {
            "version": version,
            "adapter": adapter_name(version),
            "path": str(self.history.checkpoint_dir(version)) if version else None,
        }

    def _send_event(self, payload: dict[str, Any]) -> None:
        self.scheduler.send_control_output(AlchemistControlReqOutput(rid=EVENT_RID, ok=True, payload=payload), None)

    def _requeue_journal(self) -> int:
        """After a restart: feedback not in any checkpoint trains again (by recomputation)."""
        count = 0
        for record in self.journal.queued():
            count += self.lane.enqueue(TrainingItem(
                feedback_id=record.feedback_id, prompt_ids=record.prompt_ids, target_ids=record.target_ids,
                objective=record.objective, weight=record.weight, completion_id=record.completion_id,
            ))
        return count

    # --- hooks called by AlchemistScheduler ------------------------------------------------
    # Recording and training must never take serving down: an unexpected error is logged and
    # counted, the forward goes on unrecorded, a failed training step is retried or dropped.

    def before_forward(self, batch) -> None:
        self._batch_started = time.monotonic()
        try:
            self._armed = batch.forward_mode.is_extend() and self.recorder.before_forward(batch)
        except Exception:
            self._internal_error("planning a recorded forward")
            self.recorder.capture.disarm()
            self._armed = False

    def after_forward(self) -> None:
        if not self._armed:
            return
        self._armed = False
        try:
            self.recorder.after_forward()
        except Exception:
            self._internal_error("storing recorded activations")

    def on_requests_received(self, rids: list[str], training_before_s: float) -> None:
        """Remember, per new request, the training that ran while it may have been waiting."""
        for rid in rids:
            self._arrival_training_s[rid] = training_before_s
        if len(self._arrival_training_s) > MAX_PENDING_ARRIVALS:  # aborted before their prefill
            for rid in list(self._arrival_training_s)[: len(self._arrival_training_s) // 2]:
                del self._arrival_training_s[rid]

    def take_training_since_ingest(self) -> float:
        seconds, self._training_since_ingest = self._training_since_ingest, 0.0
        return seconds

    def after_batch_result(self, batch, running: int, waiting: int) -> None:
        self.controller.on_batch(batch.forward_mode.is_decode(), self._batch_started,
                                 time.monotonic() - self._batch_started)
        if batch.forward_mode.is_extend():
            self._count_first_tokens(batch)
        try:
            for req in batch.reqs:
                if req.finished() and self.samples.get(req.rid) is None:
                    self._on_request_finished(req)
        except Exception:
            self._internal_error("registering finished requests")
        self.train(running=running, waiting=waiting)
        self.housekeeping()

    def _count_first_tokens(self, batch) -> None:
        now = time.perf_counter()  # SGLang's request timestamps are perf_counter values
        for req in batch.reqs:
            if len(req.output_ids) != 1:  # a chunk before the last, or a retracted request's re-prefill
                continue
            training = self._arrival_training_s.pop(req.rid, None)
            queued_at = getattr(getattr(req, "time_stats", None), "wait_queue_entry_time", 0.0)
            if training is not None and queued_at > 0.0:
                self.controller.on_first_token(now - queued_at + training)

    def on_idle(self, running: int, waiting: int) -> None:
        if running == 0:
            self.controller.on_idle()
        self.train(running=running, waiting=waiting)
        self.housekeeping()

    def train(self, running: int, waiting: int) -> None:
        lane, controller = self.lane, self.controller
        grant = controller.grant(lane.has_work(), lane.paused, running, waiting)
        remaining, slices, deferred = grant.budget_s, 0, False
        idle = grant.reason == "idle"
        try:
            while remaining > 0:
                tokens = lane.next_slice_tokens()
                if controller.predicted_slice_s(tokens) > remaining and not (idle and slices == 0):
                    deferred = True
                    break
                started = time.perf_counter()
                info = lane.run_one_slice(idle)
                if info is None:
                    break
                elapsed = time.perf_counter() - started
                controller.observe_slice(info.tokens, elapsed, while_serving=not idle)
                remaining -= elapsed
                slices += 1
                self._training_since_ingest += elapsed
        except Exception:
            self._internal_error("running a training slice")
        controller.observe_grant_use(grant, slices, deferred)

    def housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_housekeeping >= HOUSEKEEPING_INTERVAL_S:
            self._last_housekeeping = now
            self.samples.expire(now)

    def _on_request_finished(self, req) -> None:
        reason = req.finished_reason.to_json() if req.finished_reason is not None else {"type": "unknown"}
        if reason.get("type") == "abort":
            self.samples.abort(req.rid)
            return
        self.samples.finish(
            req.rid, list(req.origin_input_ids), list(req.output_ids), reason.get("type", "stop"),
            self.version_of(req.lora_id),
        )

    def _internal_error(self, what: str) -> None:
        self.internal_errors += 1
        logger.exception("sglang_alchemist: error while %s (serving continues)", what)

    # --- control operations ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        geometry = self.frozen.geometry
        return {
            "model": {
                "architecture": geometry.architecture,
                "layers": geometry.num_layers,
                "dtype": str(self.dtype).replace("torch.", ""),
                "recorded_bytes_per_token_per_layer": bytes_per_token_per_layer(geometry, self.dtype),
            },
            "recording": {"policy": self.recorder.policy.mode, "sample_rate": self.recorder.policy.sample_rate,
                          **self.recorder.status()},
            "store": self.store.status(),
            "samples": self.samples.status(),
            "training": {**self.trainer.status(), **self.lane.status()},
            "versions": {"current": self.history.current, "latest": self.history.latest},
            "scheduler": self.controller.status(),
            "journal": self.journal.counts(),
            "internal_errors": self.internal_errors,
        }

    def op_lookup(self, payload: dict[str, Any]) -> dict[str, Any]:
        sample = self._served_sample(payload)
        return {**sample.public(), "prompt_ids": sample.prompt_ids, "output_ids": sample.output_ids,
                "finish_reason": sample.finish_reason}

    def op_enqueue(self, payload: dict[str, Any]) -> dict[str, Any]:
        completion_id = payload.get("completion_id")
        sample = self.samples.take(completion_id) if completion_id else None
        item = TrainingItem(
            feedback_id=payload["feedback_id"], prompt_ids=list(payload["prompt_ids"]),
            target_ids=list(payload["target_ids"]), objective=payload["objective"],
            weight=float(payload.get("weight", 1.0)), completion_id=completion_id, sample=sample,
        )
        blocker = self.trainer.replay_blocker(item)
        queued = self.lane.enqueue(item)
        return {"activations_reusable": queued and blocker is None, "replay_blocker": blocker, "queued": queued}

    def op_drop(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Feedback that is journaled but not trained (e.g. a reject with the 'skip' objective)."""
        completion_id = payload.get("completion_id")
        if completion_id:
            self.samples.release(completion_id)
        return {"released": bool(completion_id)}

    def op_versions(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.history.public()

    def op_rollback(self, payload: dict[str, Any]) -> dict[str, Any]:
        version = payload.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version not in self.history.versions:
            raise ControlError(404, f"unknown adapter version {version!r}; see GET /v1/alchemist/versions")
        if not self.history.available(version):
            raise ControlError(409, f"the checkpoint of version {version} was deleted by retention")
        self.lane.discard_unpublished()
        self.trainer.rollback(version)
        return self._version_payload(version)

    def op_pause(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.lane.paused = True
        return {"paused": True}

    def op_resume(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.lane.paused = False
        return {"paused": False}

    def op_set_slo(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Change the serving targets at run time (``tpot_slo_ms``, ``ttft_slo_ms``, ``train_share``)."""
        values = {}
        for key in ("tpot_slo_ms", "ttft_slo_ms", "train_share"):
            if key not in payload:
                continue
            value = payload[key]
            valid = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            if key == "train_share":
                valid = valid and value <= 1
            if not valid:
                allowed = "a number in (0, 1]" if key == "train_share" else "a number > 0"
                raise ControlError(400, f"'{key}': invalid value {value!r}; allowed: {allowed}")
            values[key] = float(value)
        unknown = set(payload) - {"tpot_slo_ms", "ttft_slo_ms", "train_share"}
        if unknown:
            raise ControlError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        self.controller.set_targets(
            tpot_slo_s=values["tpot_slo_ms"] / 1000 if "tpot_slo_ms" in values else None,
            ttft_slo_s=values["ttft_slo_ms"] / 1000 if "ttft_slo_ms" in values else None,
            train_share=values.get("train_share"),
        )
        return self.controller.status()

    def op_set_recording(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Change the recording policy at run time (``policy``, optional ``sample_rate``)."""
        from sglang_alchemist.config import RECORD_POLICIES

        policy = payload.get("policy")
        if policy not in RECORD_POLICIES:
            raise ControlError(400, f"'policy': invalid value {policy!r}; allowed: {', '.join(RECORD_POLICIES)}")
        if policy != "none" and self.config.record == "none" and self.device.type == "cuda":
            raise ControlError(409, "this server started with --alchemist-record none, so prefill runs in CUDA "
                                    "graphs where capture hooks do not fire; restart it with recording enabled")
        rate = payload.get("sample_rate", self.recorder.policy.sample_rate)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ControlError(400, f"'sample_rate': invalid value {rate!r}; allowed: a number between 0 and 1")
        self.recorder.policy = RecordingPolicy(policy, float(rate))
        return {"policy": policy, "sample_rate": float(rate)}

    def op_debug_record(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Write a served sample's recorded tensors to a safetensors file (tests, investigations)."""
        from safetensors.torch import save_file

        sample = self._served_sample(payload)
        info = sample.public()
        if not info["has_activations"]:
            return {**info, "path": None}
        tensors = {}
        for layer in range(self.frozen.geometry.num_layers):
            loaded = sample.activations.load(layer, LAYER_TENSORS)
            tensors.update({f"layer{layer}.{name}": t.to("cpu").contiguous() for name, t in loaded.items()})
        tensors["final_hidden"] = sample.activations.final_hidden().to("cpu").contiguous()
        path = self._debug_path(f"record-{sample.rid}")
        save_file(tensors, str(path))
        views = [
            {"chunk": v.chunk.chunk_id, "owner": v.chunk.owner, "positions": [v.position_start, v.position_end],
             "tiers": [layer.tier.value for layer in v.chunk.layers]}
            for v in sample.activations.views
        ]
        return {**info, "path": str(path), "views": views}

    def op_debug_move_to_host(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Move given layers of a served sample's record to the host tier (tests of hedging)."""
        sample = self._served_sample(payload)
        if sample.activations is None:
            raise ControlError(409, "this response has no recorded activations")
        moved = 0
        for view in sample.activations.views:
            for layer in payload.get("layers", []):
                if self.store.move_layer_to_host(view.chunk, int(layer)):
                    moved += 1
        return {"moved": moved}

    def op_debug_gradients(self, payload: dict[str, Any]) -> dict[str, Any]:
        """LoRA gradients of a (batch of) feedback item(s) at the trainer's current weights.

        ``items``: [{"completion_id"?, "prompt_ids", "target_ids", "objective"?, "weight"?}];
        ``path``: "auto" (replay when possible) or "recompute"; ``hedge``: optional override.
        Nothing is trained and no sample is consumed. Gradients go to a safetensors file.
        """
        from safetensors.torch import save_file

        items = [
            TrainingItem(
                feedback_id=f"debug-{index}", prompt_ids=list(spec["prompt_ids"]), target_ids=list(spec["target_ids"]),
                objective=spec.get("objective", "sft"), weight=float(spec.get("weight", 1.0)),
                sample=self.samples.get(spec["completion_id"]) if spec.get("completion_id") else None,
            )
            for index, spec in enumerate(payload["items"])
        ]
        hedge = self.trainer.hedge
        saved_mode, before = hedge.mode, dict(hedge.counters.__dict__)
        hedge.mode = payload.get("hedge", hedge.mode)
        try:
            grads, paths = self.trainer.gradients(items, force_recompute=payload.get("path") == "recompute")
        finally:
            hedge.mode = saved_mode
        path = self._debug_path(f"gradients-{int(time.time() * 1000)}")
        save_file(grads, str(path))
        return {
            "path": str(path), "paths": paths, "version": self.history.current,
            "hedge": {k: v - before[k] for k, v in hedge.counters.__dict__.items()},
        }

    def _debug_path(self, name: str) -> Path:
        directory = self.state_dir / "debug"
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{name}.safetensors"

    def _served_sample(self, payload: dict[str, Any]):
        rid = payload.get("id")
        sample = self.samples.get(rid) if isinstance(rid, str) else None
        if sample is None:
            raise ControlError(404, f"no served response with id {rid!r} is waiting for feedback "
                                    "(unknown, already given feedback, or expired)")
        return sample

