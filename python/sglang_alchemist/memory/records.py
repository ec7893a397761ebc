"""What is recorded per prompt token and layer, and what it costs.

The replay (``training/replay.py``) rebuilds a prompt layer's backward from these values
alone; each is a tensor the serving forward already computed, copied out for the recorded
rows only. Per layer ``l`` and prompt token:

==========  ===========================  ===============================================
name        width                        what it is / what the backward uses it for
==========  ===========================  ===============================================
x           hidden                       residual entering the layer: RMSNorm backward,
                                         LoRA grads of q/k/v (through the recomputed norm)
q           heads*head_dim               q projection output (before q-norm and RoPE)
k           kv_heads*head_dim            k projection output (before k-norm and RoPE);
                                         the forward hands RoPE(k) to the target tokens
v           kv_heads*head_dim            v projection output (the KV cache's V)
attn_out    heads*head_dim               attention output before o_proj: attention
                                         backward (its ``O``), LoRA grads of o_proj
h           hidden                       residual after attention: post-attention norm
gate_up     2*intermediate               gate and up projection outputs: SiLU-gate
                                         backward, LoRA grads of down_proj
==========  ===========================  ===============================================

Once per request: ``final_hidden``, the residual after the last layer at the last prompt
token (it predicts the first target token). Values are stored in the model's dtype.

Not recorded, because the backward recomputes them cheaply from the above: norms, RoPE,
SiLU·up, residual sums, the attention softmax (a math backward recomputes it from q and k,
so no log-sum-exp is kept: the serving attention kernels on CPU do not return one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYER_TENSORS = ("x", "q", "k", "v", "attn_out", "h", "gate_up")


def layer_widths(geometry) -> dict[str, int]:
    return {
        "x": geometry.hidden_size,
        "q": geometry.q_size,
        "k": geometry.kv_size,
        "v": geometry.kv_size,
        "attn_out": geometry.q_size,
        "h": geometry.hidden_size,
        "gate_up": 2 * geometry.intermediate_size,
    }


def bytes_per_token_per_layer(geometry, dtype: torch.dtype) -> int:
    element = torch.empty(0, dtype=dtype).element_size()
    return sum(layer_widths(geometry).values()) * element


@dataclass
class LayerTensors:
    """One layer's recorded tensors for a run of prompt tokens (rows = tokens)."""

    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_out: torch.Tensor
    h: torch.Tensor
    gate_up: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in LAYER_TENSORS}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> LayerTensors:
        return cls(**{name: tensors[name] for name in LAYER_TENSORS})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.as_dict().values())
