"""The replay: back-propagate through a prompt layer using its recorded values, no forward.

For a prompt token, serving already computed every value of the layer. The backward needs
those values, not the computation, so each expensive op becomes an autograd function whose
forward *returns the recorded output* and whose backward is the op's real backward:

- ``_ReplayedLinear`` (frozen projection ``y = x W^T``): forward returns the record,
  backward ``dx = dy W``. The LoRA part is added as ``delta - delta.detach()``: zero in value
  (so the output stays exactly the record, which already contains the served adapter's
  contribution) while autograd differentiates it, giving the LoRA gradients and their share
  of ``dx``. The LoRA matmuls are rank-r, so recomputing them is cheap.
- ``_ReplayedAttention``: forward returns the recorded attention output; backward is a math
  attention backward that recomputes the softmax from q and k one block of queries at a time.
- ``_ReplayedSum`` (residual adds): forward returns the recorded sum; backward passes ``dy`` to
  both inputs.

Cheap elementwise ops (RMSNorm, RoPE, Qwen3's q/k norms, SiLU·up) are recomputed from
recorded inputs by ordinary autograd. :func:`replay_layer_backward` builds this small graph
for one layer, runs one backward from the gradient of the layer's output and the gradients of
its keys/values (from the target tokens, which attend to the prompt), accumulates the LoRA
gradients into the adapter's ``.grad`` and returns the gradient for the layer below.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sglang_alchemist.memory.records import LayerTensors
from sglang_alchemist.training.layers import (
    LoraPair,
    apply_rope,
    decoder_layer,
    lora_delta,
    rms_norm,
    rotate_qk,
)
from sglang_alchemist.training.model_spec import LayerWeights, ModelGeometry

ATTENTION_QUERY_BLOCK = 128  # measured fastest on CPU (cache-sized score tiles)


class _ReplayedLinear(torch.autograd.Function):
    """Outputs = recorded slices of ``x W^T`` along the output dim; backward = ``sum_i dy_i W_i``.

    One product per output slice rather than one product with concatenated gradients: the
    same arithmetic without copying the (large) gradients into one tensor.
    """

    @staticmethod
    def forward(ctx, x, weight, *values):
        ctx.weight_rows = torch.split(weight, [value.shape[-1] for value in values], dim=0)
        outputs = tuple(value.view_as(value) for value in values)
        return outputs if len(outputs) > 1 else outputs[0]

    @staticmethod
    def backward(ctx, *grads):
        grad_x = None
        for grad, rows in zip(grads, ctx.weight_rows, strict=True):
            if grad is not None:
                part = grad.to(rows.dtype) @ rows
                grad_x = part if grad_x is None else grad_x.add_(part)
        return (grad_x, None, *([None] * len(grads)))


class _ReplayedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, None


class _ReplayedAttention(torch.autograd.Function):
    """Causal GQA self-attention of the prompt; forward returns the recorded output."""

    @staticmethod
    def forward(ctx, q, k, v, recorded_out):
        ctx.save_for_backward(q, k, v, recorded_out)
        return recorded_out.view_as(recorded_out)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        grad_q, grad_k, grad_v = causal_attention_backward(q, k, v, out, grad_out)
        return grad_q, grad_k, grad_v, None


def causal_attention_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
    query_block: int = ATTENTION_QUERY_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Math backward of softmax(q k^T / sqrt(D)) v with a causal mask, blockwise over queries.

    q: [P, H, D]; k, v: [P, G, D]; out, grad_out: [P, H*D]. The softmax is recomputed from q
    and k (no log-sum-exp is stored); ``D_i = sum(dO_i * O_i)`` uses the recorded output.
    Memory is bounded by one [H, block, P] score tile.
    """
    tokens, heads, head_dim = q.shape
    groups = heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim)
    compute = torch.float32
    q_h = q.transpose(0, 1).to(compute)  # [H, P, D]
    k_h = k.repeat_interleave(groups, dim=1).transpose(0, 1).to(compute)
    v_h = v.repeat_interleave(groups, dim=1).transpose(0, 1).to(compute)
    out_h = out.view(tokens, heads, head_dim).transpose(0, 1).to(compute)
    grad_out_h = grad_out.view(tokens, heads, head_dim).transpose(0, 1).to(compute)
    grad_q_h = torch.empty_like(q_h)
    grad_k_h = torch.zeros_like(k_h)
    grad_v_h = torch.zeros_like(v_h)
    row_dot = (grad_out_h * out_h).sum(-1, keepdim=True)  # [H, P, 1]
    for start in range(0, tokens, query_block):
        end = min(tokens, start + query_block)
        scores = (q_h[:, start:end] @ k_h[:, :end].transpose(1, 2)) * scale  # [H, c, end]
        key_pos = torch.arange(end, device=q.device)
        query_pos = torch.arange(start, end, device=q.device)[:, None]
        scores = scores.masked_fill(key_pos[None, :] > query_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        grad_block = grad_out_h[:, start:end]
        grad_v_h[:, :end] += probs.transpose(1, 2) @ grad_block
        grad_probs = grad_block @ v_h[:, :end].transpose(1, 2)
        grad_scores = probs * (grad_probs - row_dot[:, start:end]) * scale
        grad_q_h[:, start:end] = grad_scores @ k_h[:, :end]
        grad_k_h[:, :end] += grad_scores.transpose(1, 2) @ q_h[:, start:end]
    kv_heads = k.shape[1]
    grad_k = grad_k_h.view(kv_heads, groups, tokens, head_dim).sum(1).transpose(0, 1)
    grad_v = grad_v_h.view(kv_heads, groups, tokens, head_dim).sum(1).transpose(0, 1)
    return (
        grad_q_h.transpose(0, 1).to(q.dtype),
        grad_k.to(k.dtype),
        grad_v.to(v.dtype),
    )


def _plus_lora(replayed: torch.Tensor, x: torch.Tensor, pair: LoraPair | None, scale: float) -> torch.Tensor:
    """Add the LoRA path's gradient without changing the recorded value (see module doc)."""
    delta = lora_delta(x, pair, scale)
    return replayed if delta is None else replayed + (delta - delta.detach())


def _unread_output(rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """The forward value of a replayed op whose recorded output is used instead.

    ``_ReplayedLinear``/``_ReplayedSum`` return the recorded tensor and only need the shape of
    what they stand for; an expanded zero costs no memory.
    """
    return like.new_zeros(1, 1).expand(rows, width)


def prompt_keys_values(
    record_k: torch.Tensor, record_v: torch.Tensor, weights: LayerWeights, geometry: ModelGeometry,
    cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's keys after (norm and) RoPE, and values, as the target tokens attend to them."""
    tokens = record_k.shape[0]
    k = record_k.view(tokens, geometry.num_kv_heads, geometry.head_dim)
    if weights.k_norm is not None:
        k = rms_norm(k, weights.k_norm, geometry.rms_norm_eps)
    return apply_rope(k, cos, sin), record_v.view(tokens, geometry.num_kv_heads, geometry.head_dim)


def replay_layer_backward(
    record: LayerTensors,
    weights: LayerWeights,
    geometry: ModelGeometry,
    lora: dict[str, LoraPair],
    scale: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    grad_out: torch.Tensor,
    grad_k_rot: torch.Tensor | None,
    grad_v: torch.Tensor | None,
    need_input_grad: bool,
) -> torch.Tensor | None:
    """Back-propagate one prompt layer from its record; LoRA grads accumulate in ``.grad``.

    ``grad_out``: gradient of the layer's output residual ([P, hidden]); ``grad_k_rot`` and
    ``grad_v``: gradients of the prompt keys/values from the target tokens' attention
    ([P, kv_heads, head_dim]), or None when no target token attends. Returns the gradient of
    the layer's input residual, or None when ``need_input_grad`` is False (the first layer:
    nothing below it is trained).
    """
    eps = geometry.rms_norm_eps
    tokens = record.x.shape[0]
    with torch.enable_grad():
        x = record.x.detach().requires_grad_(need_input_grad)
        xn = rms_norm(x, weights.input_norm, eps)
        q, k, v = _ReplayedLinear.apply(xn, weights.qkv, record.q, record.k, record.v)
        q = _plus_lora(q, xn, lora.get("q_proj"), scale)
        k = _plus_lora(k, xn, lora.get("k_proj"), scale)
        v = _plus_lora(v, xn, lora.get("v_proj"), scale)
        q_rot, k_rot = rotate_qk(q, k, weights, geometry, cos, sin)
        v_heads = v.view(tokens, geometry.num_kv_heads, geometry.head_dim)
        attn_out = _ReplayedAttention.apply(q_rot, k_rot, v_heads, record.attn_out)
        attn_proj = _ReplayedLinear.apply(attn_out, weights.o, _unread_output(tokens, geometry.hidden_size, x))
        attn_proj = _plus_lora(attn_proj, attn_out, lora.get("o_proj"), scale)
        h = _ReplayedSum.apply(x, attn_proj, record.h)
        hn = rms_norm(h, weights.post_norm, eps)
        gate, up = _ReplayedLinear.apply(
            hn, weights.gate_up, *torch.split(record.gate_up, geometry.intermediate_size, dim=-1)
        )
        gate = _plus_lora(gate, hn, lora.get("gate_proj"), scale)
        up = _plus_lora(up, hn, lora.get("up_proj"), scale)
        gated = F.silu(gate) * up
        down = _ReplayedLinear.apply(gated, weights.down, _unread_output(tokens, geometry.hidden_size, x))
        down = _plus_lora(down, gated, lora.get("down_proj"), scale)
        out = _ReplayedSum.apply(h, down, _unread_output(tokens, geometry.hidden_size, x))

        pairs = [(out, grad_out), (k_rot, grad_k_rot), (v_heads, grad_v)]
        backward_from(pairs)
    return x.grad if need_input_grad else None


def backward_from(pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """One backward from the roots that carry a gradient and depend on something trainable.

    A root may not: with LoRA only on some projections, the first layer's keys depend on no
    trainable tensor at all.
    """
    live = [(root, grad) for root, grad in pairs if grad is not None and root.requires_grad]
    if live:
        torch.autograd.backward([root for root, _ in live], [grad for _, grad in live])


def recompute_layer_record(
    x: torch.Tensor,
    weights: LayerWeights,
    geometry: ModelGeometry,
    lora: dict[str, LoraPair],
    scale: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> LayerTensors:
    """A layer's record recomputed from its input alone (hedging: cheaper than a reload)."""
    with torch.no_grad():
        return decoder_layer(x, weights, geometry, lora, scale, cos, sin, keep_intermediates=True).intermediates

