"""Debug operations (``--alchemist-debug-endpoints`` only): for tests and investigations.

- ``debug_record``: write a served sample's recorded tensors to a safetensors file;
- ``debug_gradients``: LoRA gradients of given items at the trainer's current weights, written
  to a safetensors file - computed in the training thread between two slices, with the
  gradients of an update in progress set aside and put back, so it never corrupts training;
- ``debug_move_to_host``: move layers of a sample's record to the host tier (hedging tests).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sglang_alchemist.memory.records import LAYER_TENSORS
from sglang_alchemist.memory.store import TRUNK_TENSORS
from sglang_alchemist.scheduler.control_ops import ControlError, Deferred
from sglang_alchemist.training.trainer import TrainingItem


class DebugOps:
    def __init__(self, runtime) -> None:
        self.runtime = runtime

    def table(self) -> dict:
        return {"debug_record": self.record, "debug_gradients": self.gradients,
                "debug_move_to_host": self.move_to_host}

    def _path(self, name: str) -> Path:
        directory = self.runtime.state_dir / "debug"
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{name}.safetensors"

    def _sample(self, payload: dict[str, Any]):
        rid = payload.get("id")
        sample = self.runtime.samples.get(rid) if isinstance(rid, str) else None
        if sample is None:
            raise ControlError(404, f"no served response with id {rid!r} is waiting for feedback")
        return sample

    def record(self, payload: dict[str, Any]) -> dict[str, Any]:
        from safetensors.torch import save_file

        sample = self._sample(payload)
        info = sample.public()
        activations = sample.activations
        if activations is None or activations.rows_recorded == 0:
            return {**info, "path": None, "views": []}
        tensors = {}
        segments = activations.segments()
        store = self.runtime.store
        for layer in range(store.num_layers):  # the trunk's layers keep their keys and values only
            names = LAYER_TENSORS if layer >= store.first_layer else TRUNK_TENSORS
            for start, end in segments:
                loaded = activations.load(layer, names, start, end)
                for name, tensor in loaded.items():
                    key = f"layer{layer}.{name}" if len(segments) == 1 else f"layer{layer}.{name}.{start}"
                    tensors[key] = tensor.to("cpu").contiguous()
        final = activations.final_hidden()
        if final is not None:
            tensors["final_hidden"] = final.to("cpu").contiguous()
        path = self._path(f"record-{sample.rid}")
        save_file(tensors, str(path))
        views = [
            {"chunk": v.chunk.chunk_id, "owner": v.chunk.owner, "positions": [v.position_start, v.position_end],
             "tiers": [layer.tier.value for layer in v.chunk.layers]}
            for v in activations.live_views()
        ]
        return {**info, "path": str(path), "views": views, "segments": segments,
                "first_adapted_layer": store.first_layer, "trunk_layers_keep": list(TRUNK_TENSORS)}

    def move_to_host(self, payload: dict[str, Any]) -> dict[str, Any]:
        sample = self._sample(payload)
        if sample.activations is None:
            raise ControlError(409, "this response has no recorded activations")
        moved = 0
        for view in sample.activations.live_views():
            for layer in payload.get("layers", []):
                if self.runtime.store.move_layer_to_host(view.chunk, int(layer)):
                    moved += 1
        return {"moved": moved}

    def gradients(self, payload: dict[str, Any]) -> Deferred:
        """``items``: [{"completion_id"?, "prompt_ids", "target_ids", "objective"?, "weight"?}];
        ``path``: "auto" (replay when possible) or "recompute"; ``hedge``: optional override."""
        runtime = self.runtime
        items = [
            TrainingItem(
                feedback_id=f"debug-{index}", prompt_ids=list(spec["prompt_ids"]), target_ids=list(spec["target_ids"]),
                objective=spec.get("objective", "sft"), weight=float(spec.get("weight", 1.0)),
                sample=runtime.samples.get(spec["completion_id"]) if spec.get("completion_id") else None,
            )
            for index, spec in enumerate(payload["items"])
        ]

        def job() -> dict[str, Any]:
            from safetensors.torch import save_file

            trainer = runtime.trainer
            hedge = trainer.hedge
            saved_mode, before = hedge.mode, dict(hedge.counters.__dict__)
            hedge.mode = payload.get("hedge", hedge.mode)
            try:
                grads, paths = trainer.gradients(items, force_recompute=payload.get("path") == "recompute")
            finally:
                hedge.mode = saved_mode
            path = self._path(f"gradients-{int(time.time() * 1000)}")
            save_file(grads, str(path))
            return {"path": str(path), "paths": paths, "version": runtime.history.current,
                    "hedge": {k: v - before[k] for k, v in hedge.counters.__dict__.items()}}

        return Deferred(job)
