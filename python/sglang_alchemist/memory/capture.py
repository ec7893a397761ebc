"""Capture hooks on SGLang's model: write the recorded rows of the real prefill forward into the pool.

PyTorch forward hooks on the projections of SGLang's own ``LlamaForCausalLM`` /
``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` modules (after SGLang's LoRA manager wrapped them,
so projection outputs include the served adapter's contribution):

==========================  ======================================================
module (per layer)          taken from it
==========================  ======================================================
model.embed_tokens          output: the residual entering layer 0
self_attn.qkv_proj          output: q, k, v (split by width); the residual ``x``
                            entering this layer is also written now
self_attn.o_proj            input: ``attn_out``; output ``a`` gives ``h = x + a``
mlp.gate_up_proj            output: ``gate_up``
mlp.down_proj               output ``d`` gives the next layer's residual ``h + d``
==========================  ======================================================

The frozen trunk's layers (below the store's ``first_layer``) store their keys and values only
(``store.TRUNK_TENSORS``): their other hooks still fire, to carry the residual stream up to the
first adapted layer, whose ``x`` is the trunk's output.

The residual stream is rebuilt from projection outputs rather than read from SGLang's fused
add-RMSNorm boundaries, whose internal layout is an implementation detail; the sums are the
same additions SGLang performs, in the same order (in place, on one small buffer per recorded
request). A recorded request's rows are contiguous in the forward's token dimension, so each
hook hands the store a *view* of them, which it copies straight into the chunk's pages: one
copy per tensor, no allocation per request. Unrecorded requests cost nothing beyond one ``is
None`` check per hook, and decode forwards are never armed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_alchemist.memory.store import ActivationStore, RecordedChunk


@dataclass
class CaptureSegment:
    """The rows of one request in the next forward: batch rows [row, row + count) -> ``chunk``."""

    row: int
    count: int
    chunk: RecordedChunk
    residual: torch.Tensor | None = None


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class PrefillCapture:
    """Installs the hooks once; ``arm(segments)`` before a forward, ``disarm()`` after it."""

    def __init__(self, model: torch.nn.Module, num_layers: int, store: ActivationStore, q_size: int,
                 kv_size: int) -> None:
        inner = model.model
        self.store = store
        self.q_size, self.kv_size = q_size, kv_size
        self.num_layers = num_layers
        self.first_layer = store.first_layer  # layers below keep their keys and values only
        self._segments: list[CaptureSegment] | None = None
        self._calls = 0
        self._handles = [inner.embed_tokens.register_forward_hook(self._on_embed)]
        for index in range(num_layers):
            layer = inner.layers[index]
            self._handles += [
                layer.self_attn.qkv_proj.register_forward_hook(self._hook(index, self._on_qkv)),
                layer.self_attn.o_proj.register_forward_hook(self._hook(index, self._on_o_proj)),
                layer.mlp.gate_up_proj.register_forward_hook(self._hook(index, self._on_gate_up)),
                layer.mlp.down_proj.register_forward_hook(self._hook(index, self._on_down)),
            ]

    @property
    def expected_calls(self) -> int:
        return 1 + 4 * self.num_layers

    def arm(self, segments: list[CaptureSegment]) -> None:
        self._segments = segments
        self._calls = 0

    def disarm(self) -> tuple[list[CaptureSegment], bool]:
        """The armed segments and whether every hook fired (False e.g. inside a CUDA-graph replay)."""
        segments, complete = self._segments or [], self._calls == self.expected_calls
        self._segments = None
        return segments, complete

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    # --- hooks -------------------------------------------------------------------------------

    def _hook(self, index, function):
        def hook(module, inputs, output):
            if self._segments is not None:
                self._calls += 1
                function(index, inputs, output)

        return hook

    def _on_embed(self, module, inputs, output) -> None:
        if self._segments is None:
            return
        self._calls += 1
        out = _first(output)
        for segment in self._segments:
            segment.residual = out[segment.row : segment.row + segment.count].clone()

    def _on_qkv(self, index, inputs, output) -> None:
        out = _first(output)
        q, kv = self.q_size, self.kv_size
        write = self.store.write
        adapted = index >= self.first_layer
        for s in self._segments:
            rows = out[s.row : s.row + s.count]
            if adapted:
                write(s.chunk, index, "x", s.residual)
                write(s.chunk, index, "q", rows[:, :q])
            write(s.chunk, index, "k", rows[:, q : q + kv])
            write(s.chunk, index, "v", rows[:, q + kv : q + 2 * kv])

    def _on_o_proj(self, index, inputs, output) -> None:
        out = _first(output)
        stored = index >= self.first_layer
        for s in self._segments:
            if stored:
                self.store.write(s.chunk, index, "attn_out", inputs[0][s.row : s.row + s.count])
            s.residual.add_(out[s.row : s.row + s.count])
            if stored:
                self.store.write(s.chunk, index, "h", s.residual)

    def _on_gate_up(self, index, inputs, output) -> None:
        if index < self.first_layer:
            return
        out = _first(output)
        for s in self._segments:
            self.store.write(s.chunk, index, "gate_up", out[s.row : s.row + s.count])

    def _on_down(self, index, inputs, output) -> None:
        out = _first(output)
        for s in self._segments:
            s.residual.add_(out[s.row : s.row + s.count])
