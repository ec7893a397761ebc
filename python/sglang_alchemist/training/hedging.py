"""Hedging: for a prompt layer whose record sits in the host tier, reload it or recompute it?

Reloading costs a host-to-device copy of the layer's recorded bytes; recomputing costs the
layer's forward over the prompt from its (small) recorded input. Which is cheaper depends on
the machine (copy bandwidth vs compute rate) and on the prompt (attention grows with its
square), so the choice is made per layer from measured rates:

    reload_s    = host_bytes(layer) / copy_bytes_per_s
    recompute_s = layer_flops(prompt_tokens) / compute_flops_per_s + input_bytes / copy_bytes_per_s

Both rates are measured once, at start-up (:func:`measure_rates`: one 1024x1024 matmul on the
serving device for compute; on CUDA one 32 MiB pinned host-to-device copy for the copy rate).
They are not updated from the trainer's own work: timing its copies and forwards on CUDA would
take a synchronisation per slice, and on a machine without a GPU there is nothing to decide -
both tiers are the same RAM, a "reload" copies nothing and always wins. So on CPU every host-tier
layer is reloaded; on CUDA the choice follows the start-up rates. ``--alchemist-hedge
reload|recompute`` forces one choice. Decisions are counted (status ``training.hedge``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sglang_alchemist.memory.records import LAYER_TENSORS
from sglang_alchemist.training.model_spec import ModelGeometry


def layer_forward_flops(geometry: ModelGeometry, tokens: int) -> float:
    """Multiply-adds x2 of one layer's forward over ``tokens`` causal positions."""
    d, q, kv, inter = geometry.hidden_size, geometry.q_size, geometry.kv_size, geometry.intermediate_size
    projections = 2 * tokens * d * (q + 2 * kv) + 2 * tokens * q * d + 2 * tokens * d * inter * 3
    attention = 2 * 2 * q * tokens * (tokens + 1) / 2  # QK^T and PV over the causal half
    return projections + attention


@dataclass
class HedgeCounters:
    reload: int = 0
    recompute: int = 0


@dataclass
class CostModelHedge:
    geometry: ModelGeometry
    mode: str = "auto"  # "auto", "reload", "recompute"
    copy_bytes_per_s: float = float("inf")
    compute_flops_per_s: float = 1e10
    counters: HedgeCounters = field(default_factory=HedgeCounters)

    def recompute_layer(self, activations, layer: int) -> bool:
        if self.mode == "auto":
            reload_s = activations.host_bytes(layer, LAYER_TENSORS) / self.copy_bytes_per_s
            input_s = activations.host_bytes(layer, ("x",)) / self.copy_bytes_per_s
            flops = layer_forward_flops(self.geometry, activations.num_tokens)
            choose_recompute = flops / self.compute_flops_per_s + input_s < reload_s
        else:
            choose_recompute = self.mode == "recompute"
        if choose_recompute:
            self.counters.recompute += 1
        else:
            self.counters.reload += 1
        return choose_recompute

    def status(self) -> dict:
        return {
            "mode": self.mode,
            "copy_bytes_per_s": None if self.copy_bytes_per_s == float("inf") else self.copy_bytes_per_s,
            "compute_flops_per_s": self.compute_flops_per_s,
            "layers_reloaded": self.counters.reload,
            "layers_recomputed": self.counters.recompute,
        }


def measure_rates(device: torch.device, dtype: torch.dtype, hedge: CostModelHedge) -> None:
    """Seed the cost model: one matmul for compute; on CUDA one pinned host-to-device copy."""
    size = 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm-up
    start = time.perf_counter()
    (a @ b).sum().item()
    hedge.compute_flops_per_s = 2 * size**3 / max(time.perf_counter() - start, 1e-9)
    if device.type == "cuda":
        host = torch.empty(32 * 1024 * 1024, dtype=torch.uint8, pin_memory=True)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        host.to(device, non_blocking=True)
        torch.cuda.synchronize(device)
        hedge.copy_bytes_per_s = host.numel() / max(time.perf_counter() - start, 1e-9)
