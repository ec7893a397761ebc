"""Capture hooks on SGLang's model: copy the recorded rows' tensors out of the real prefill forward.

PyTorch forward hooks on the projections of SGLang's own ``LlamaForCausalLM`` /
``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` modules (after SGLang's LoRA manager wrapped them,
so projection outputs include the served adapter's contribution):

==========================  ======================================================
module (per layer)          taken from it
==========================  ======================================================
model.embed_tokens          output: the residual entering layer 0
self_attn.qkv_proj          output: q, k, v (split by width); the residual ``x``
                            entering this layer is also stored now
self_attn.o_proj            input: ``attn_out``; output ``a`` gives ``h = x + a``
mlp.gate_up_proj            output: ``gate_up``
mlp.down_proj               output ``d`` gives the next layer's residual ``h + d``
==========================  ======================================================

The residual stream is rebuilt from projection outputs rather than read from SGLang's fused
add-RMSNorm boundaries, whose internal layout is an implementation detail; the sums are the
same additions SGLang performs, in the same order. Each hook first selects the recorded rows
(``index_select`` on the device), so unrecorded requests cost nothing beyond one
``is None`` check per hook, and decode forwards are never armed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CapturePlan:
    """Which rows of the next forward's token batch to record."""

    rows: torch.Tensor  # int64 on the device: indices into the forward's token dimension
    q_size: int
    kv_size: int


@dataclass
class CapturedBatch:
    layers: list[dict[str, torch.Tensor]] = field(default_factory=list)
    final_residual: torch.Tensor | None = None


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class PrefillCapture:
    """Installs the hooks once; ``arm(plan)`` before a forward, ``disarm()`` after it."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        inner = model.model
        self._plan: CapturePlan | None = None
        self._batch: CapturedBatch | None = None
        self._residual: torch.Tensor | None = None
        self._handles = [inner.embed_tokens.register_forward_hook(self._on_embed)]
        for index in range(num_layers):
            layer = inner.layers[index]
            self._handles += [
                layer.self_attn.qkv_proj.register_forward_hook(self._hook(index, self._on_qkv)),
                layer.self_attn.o_proj.register_forward_hook(self._hook(index, self._on_o_proj)),
                layer.mlp.gate_up_proj.register_forward_hook(self._hook(index, self._on_gate_up)),
                layer.mlp.down_proj.register_forward_hook(self._hook(index, self._on_down)),
            ]

    def arm(self, plan: CapturePlan, num_layers: int) -> None:
        self._plan = plan
        self._batch = CapturedBatch(layers=[{} for _ in range(num_layers)])
        self._residual = None

    def disarm(self) -> CapturedBatch | None:
        batch = self._batch
        if batch is not None:
            batch.final_residual = self._residual
        self._plan = self._batch = self._residual = None
        return batch

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    # --- hooks -------------------------------------------------------------------------------

    def _hook(self, index, function):
        def hook(module, inputs, output):
            if self._plan is not None:
                function(index, inputs, output)

        return hook

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.index_select(0, self._plan.rows)

    def _on_embed(self, module, inputs, output) -> None:
        if self._plan is not None:
            self._residual = self._rows(_first(output))

    def _on_qkv(self, index, inputs, output) -> None:
        plan = self._plan
        qkv = self._rows(_first(output))
        q, k, v = torch.split(qkv, [plan.q_size, plan.kv_size, plan.kv_size], dim=-1)
        self._batch.layers[index].update(x=self._residual, q=q.contiguous(), k=k.contiguous(), v=v.contiguous())

    def _on_o_proj(self, index, inputs, output) -> None:
        layer = self._batch.layers[index]
        layer["attn_out"] = self._rows(inputs[0])
        self._residual = self._residual + self._rows(_first(output))
        layer["h"] = self._residual

    def _on_gate_up(self, index, inputs, output) -> None:
        self._batch.layers[index]["gate_up"] = self._rows(_first(output))

    def _on_down(self, index, inputs, output) -> None:
        self._residual = self._residual + self._rows(_first(output))
