"""Everything sglang_alchemist keeps in the scheduler process, wired together.

``AlchemistScheduler`` (the SGLang subclass) owns one ``AlchemistRuntime`` and calls it from
a handful of overrides; this class holds the components and the glue between them:

- recording: ``RecordingPolicy`` -> ``PrefillRecorder`` (capture hooks) -> ``ActivationStore``;
- served samples waiting for feedback: ``SampleTable``;
- control operations (``op_*``) answered over the control channel.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from sglang_alchemist.config import AlchemistConfig
from sglang_alchemist.memory.policy import RecordingPolicy
from sglang_alchemist.memory.recorder import PrefillRecorder
from sglang_alchemist.memory.records import LAYER_TENSORS, bytes_per_token_per_layer
from sglang_alchemist.memory.samples import SampleTable
from sglang_alchemist.memory.store import ActivationStore
from sglang_alchemist.training.model_spec import FrozenModel
from sglang_alchemist.training.sglang_weights import frozen_model_from_sglang

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
ADAPTER_NAME_PREFIX = "alchemist-v"
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
        req_to_token = scheduler.req_to_token_pool.req_to_token
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
            RecordingPolicy(config.record, config.record_sample_rate), req_to_token, self.version_of, self.dtype,
        )
        self.state_dir = Path(config.state_dir)
        self._last_housekeeping = time.monotonic()
        self._armed = False
        self.internal_errors = 0

    # --- adapter versions ------------------------------------------------------------------

    def version_of(self, lora_id: str | None) -> int:
        if lora_id is None:
            return 0
        manager = getattr(self.model_runner, "lora_manager", None)
        refs = getattr(manager, "lora_refs", {}) if manager is not None else {}
        ref = refs.get(lora_id)
        return -1 if ref is None else adapter_version_from_name(ref.lora_name)

    # --- hooks called by AlchemistScheduler ------------------------------------------------

    # Recording must never take serving down: an unexpected error is logged and counted, the
    # forward goes on unrecorded, and the affected requests train by recomputation.

    def before_forward(self, batch) -> None:
        try:
            self._armed = batch.forward_mode.is_extend() and self.recorder.before_forward(batch)
        except Exception:
            self._recording_failed("planning a recorded forward")
            self.recorder.capture.disarm()
            self._armed = False

    def after_forward(self) -> None:
        if not self._armed:
            return
        self._armed = False
        try:
            self.recorder.after_forward()
        except Exception:
            self._recording_failed("storing recorded activations")

    def after_batch_result(self, batch) -> None:
        try:
            for req in batch.reqs:
                if req.finished() and self.samples.get(req.rid) is None:
                    self._on_request_finished(req)
            self.housekeeping()
        except Exception:
            self._recording_failed("registering finished requests")

    def _recording_failed(self, what: str) -> None:
        self.internal_errors += 1
        logger.exception("sglang_alchemist: error while %s (serving continues)", what)

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
            "recording": {"policy": self.config.record, **self.recorder.status()},
            "store": self.store.status(),
            "samples": self.samples.status(),
            "internal_errors": self.internal_errors,
        }

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
        path = self.state_dir / "debug" / f"record-{sample.rid}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
        views = [
            {"chunk": v.chunk.chunk_id, "owner": v.chunk.owner, "positions": [v.position_start, v.position_end],
             "tiers": [layer.tier.value for layer in v.chunk.layers]}
            for v in sample.activations.views
        ]
        return {**info, "path": str(path), "views": views}

    def _served_sample(self, payload: dict[str, Any]):
        rid = payload.get("id")
        sample = self.samples.get(rid) if isinstance(rid, str) else None
        if sample is None:
            raise ControlError(404, f"no served response with id {rid!r} is waiting for feedback")
        return sample
