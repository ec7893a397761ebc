"""Recording a prompt without SGLang: the same record the serving capture makes, from plain PyTorch.

The replay's correctness and speed are properties of the trainer core, which must be testable
and benchmarkable where SGLang is not installed (a lent GPU machine has PyTorch and
transformers only). :func:`record_prompt` runs the prompt through ``training.layers`` with
the adapter applied - as serving with that adapter version would - and keeps exactly the
tensors ``memory/records.py`` lists. :class:`InMemoryActivations` serves them to the trainer;
layers can be marked as living in a (simulated or real) host tier to exercise hedging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_alchemist.memory.records import LAYER_TENSORS
from sglang_alchemist.training.layers import decoder_layer
from sglang_alchemist.training.lora import LoraAdapter
from sglang_alchemist.training.model_spec import FrozenModel
from sglang_alchemist.training.tensor_parallel import TensorParallel, embed_tokens


class InMemoryActivations:
    def __init__(self, layers: list[dict[str, torch.Tensor]], final_hidden: torch.Tensor,
                 device: torch.device | str) -> None:
        self.layers = layers
        self._final_hidden = final_hidden
        self.device = torch.device(device)
        self.num_tokens = layers[0]["x"].shape[0]
        self.host_layers: set[int] = set()
        self._segments = [(0, self.num_tokens)]

    def forget_rows(self, start: int, end: int) -> None:
        """Make positions [start, end) unrecorded, as decode steps or an eviction would."""
        kept = []
        for a, b in self._segments:
            if a < start:
                kept.append((a, min(b, start)))
            if b > end:
                kept.append((max(a, end), b))
        self._segments = [(a, b) for a, b in kept if b > a]

    def move_to_host(self, layers) -> None:
        """Put these layers in the host tier (pinned CPU memory when the device is CUDA)."""
        for layer in layers:
            if self.device.type == "cuda":
                self.layers[layer] = {
                    name: tensor.to("cpu").pin_memory() for name, tensor in self.layers[layer].items()
                }
            self.host_layers.add(layer)

    def segments(self) -> list[tuple[int, int]]:
        return list(self._segments)

    def load(self, layer: int, names: tuple[str, ...], start: int, end: int) -> dict[str, torch.Tensor]:
        tensors = self.layers[layer]
        return {name: tensors[name][start:end].to(self.device, non_blocking=True) for name in names}

    def prefetch(self, layer: int, names: tuple[str, ...]) -> None:
        return None

    def on_device(self, layer: int) -> bool:
        return layer not in self.host_layers

    def host_bytes(self, layer: int, names: tuple[str, ...]) -> int:
        if layer not in self.host_layers:
            return 0
        return sum(self.layers[layer][n].numel() * self.layers[layer][n].element_size() for n in names)

    def final_hidden(self) -> torch.Tensor | None:
        recorded_last = bool(self._segments) and self._segments[-1][1] == self.num_tokens
        return self._final_hidden if recorded_last else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    @property
    def rows_recorded(self) -> int:
        return sum(end - start for start, end in self._segments)

    def pin(self) -> InMemoryActivations | None:
        return self if self._segments else None  # nothing to protect: no eviction here

    def unpin(self) -> None:
        return None


@dataclass
class ReferenceSample:
    """A served request as the trainer sees it (``memory.samples.ServedSample``'s protocol), recorded here."""

    prompt_ids: list[int]
    adapter_version: int
    activations: InMemoryActivations | None

    def replay_blocker(self) -> str | None:
        return None if self.activations is not None else "not_recorded"


@torch.no_grad()
def record_prompt(model: FrozenModel, adapter: LoraAdapter | None, prompt_ids: list[int],
                  tp: TensorParallel | None = None) -> InMemoryActivations:
    """``tp``: ``model``/``adapter`` are a rank's shards and the record is what that rank's
    capture keeps (``x``/``h`` whole, the rest the rank's shards); every rank calls it."""
    geometry = model.geometry
    prompt = torch.tensor(prompt_ids, device=model.device)
    cos, sin = model.rotary_cos_sin(torch.arange(len(prompt_ids)))
    hidden = embed_tokens(model, prompt, tp)
    layers = []
    for index, weights in enumerate(model.layers):
        lora = adapter.layer(index) if adapter is not None else {}
        scale = adapter.spec.scale if adapter is not None else 0.0
        output = decoder_layer(hidden, weights, geometry, lora, scale, cos, sin, keep_intermediates=True, tp=tp)
        layers.append({name: getattr(output.intermediates, name).contiguous() for name in LAYER_TENSORS})
        hidden = output.out
    return InMemoryActivations(layers, hidden[-1:].contiguous(), model.device)
