"""Differentiable building blocks of a Llama-family decoder layer, in plain PyTorch.

Numerics follow transformers (the reference the trainer's gradients are checked against):
RMSNorm in fp32 then cast, rotate-half RoPE with cos/sin from transformers' rotary class, SiLU
gating, grouped-query attention through ``scaled_dot_product_attention``. LoRA parameters are
fp32 and are cast to the activation dtype per matmul.

``decoder_layer`` runs one layer over a stream of new tokens that attend to an optional prefix
of keys/values (the prompt, for the target tokens of a training sample) and can also return
the intermediate values that serving records, which is how recorded activations are produced
without SGLang (tests, the GPU benchmark) and how a layer is recomputed from its input.

With ``tp`` (``tensor_parallel.TensorParallel``), ``weights``/``geometry``/``lora`` are one
rank's shard and the layer runs the Megatron way SGLang serves it: column-parallel q/k/v and
gate/up on the replicated input, row-parallel o/down whose base output and LoRA-A partial are
all-reduced; see ``tensor_parallel`` for where each collective sits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_alchemist.memory.records import LayerTensors
from sglang_alchemist.training.model_spec import LayerWeights, ModelGeometry
from sglang_alchemist.training.tensor_parallel import (
    TensorParallel,
    active_tp,
    copy_to_tp,
    graph_lora,
    reduce_from_tp,
)

LoraPair = tuple[torch.Tensor, torch.Tensor]  # (A [rank, in], B [out, rank])


class _RMSNorm(torch.autograd.Function):
    """``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)`` with its backward written out.

    transformers' numerics (statistics in fp32, weight applied in the input dtype). Autograd of
    the plain expression runs about ten passes over ``x`` and keeps four tensors of its size; this
    keeps ``x`` and the per-row ``rstd`` and runs four passes each way: 1.6 -> 0.6 ms forward +
    backward on [575, 576] fp32 (CPU, 2 threads; docs/NOTES.md, "Replay kernels, third pass"). The
    replay runs two per layer.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.to(torch.float32)
        grad_normed = (grad * weight).to(torch.float32)  # d/d(x32 * rstd), through the cast
        # d/dx32 of x32 * rstd: rstd * (g - x32 * rstd^2 * mean(g * x32))
        coefficient = (grad_normed * x32).mean(-1, keepdim=True).mul_(rstd.square())
        grad_x = torch.addcmul(grad_normed, x32, coefficient, value=-1).mul_(rstd).to(x.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:  # frozen in LoRA training; exact for completeness
            normed = (x32 * rstd).to(x.dtype)
            grad_weight = (grad * normed).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def _add_lora(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``y += scale * u B^T`` in place: one pass over ``y`` where ``y + delta`` took three (the
    delta, its scaled copy, the sum). Autograd allows it: the products that made ``y`` keep their
    inputs, not their output."""
    return y.addmm_(u, b.to(u.dtype).t(), alpha=scale)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pair: LoraPair | None, scale: float
) -> torch.Tensor:
    return stacked_linear(x, weight, bias, (pair,), scale, [weight.shape[0]])


def stacked_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pairs: tuple[LoraPair | None, ...],
    scale: float, sizes: list[int],
) -> torch.Tensor:
    """Projections of one input whose weights are stacked (SGLang's fused q/k/v and gate/up), as
    one [rows, sum(sizes)] output: one base product and one LoRA-A product for all of them (the A
    matrices stacked), each LoRA B added in place into its own columns. The output is also the
    layout serving records gate/up in, so nothing is copied to join them.

    Measured against one product per projection and ``y + delta`` (SmolLM2's no-grad forward over
    all 30 layers, CPU, 2 threads, old and new alternating): 1.09x at 1,056 rows, 1.14x at 256
    rows; 64 rows over a 512-row prefix inside the noise (docs/NOTES.md, "The forward").
    """
    y = F.linear(x, weight, bias)
    live = [index for index, pair in enumerate(pairs) if pair is not None]
    if not live:
        return y
    a = pairs[live[0]][0] if len(live) == 1 else torch.cat([pairs[index][0] for index in live])
    u = x @ a.to(x.dtype).t()
    starts = [0, *itertools.accumulate(sizes)]
    rank_start = 0
    for index in live:
        rank = pairs[index][0].shape[0]
        # a slice, not one of split's outputs: autograd lets a slice be modified in place
        columns = y[..., starts[index]:starts[index] + sizes[index]]
        _add_lora(columns, u[..., rank_start:rank_start + rank], pairs[index][1], scale)
        rank_start += rank
    return y


def row_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, pair: LoraPair | None, scale: float, tp: TensorParallel | None
) -> torch.Tensor:
    """o_proj/down_proj (no bias): :func:`linear`, or with ``tp`` the rank's input columns with the
    base output and the LoRA-A partial all-reduced (SGLang's ``RowParallelLinearWithLoRA``)."""
    if active_tp(tp) is None:
        return linear(x, weight, None, pair, scale)
    y = reduce_from_tp(F.linear(x, weight), tp)
    if pair is None:
        return y
    return _add_lora(y, reduce_from_tp(x @ pair[0].to(x.dtype).t(), tp), pair[1], scale)


class _RoPE(torch.autograd.Function):
    """Rotate-half RoPE (transformers' ``apply_rotary_pos_emb``) with its backward written out.

    The backward of a rotation is the rotation the other way: ``g * cos + rotate_half^T(g * sin)``.
    Three passes each way instead of autograd's five forward (mul, neg, cat, mul, add) and six
    backward, and no [tokens, heads, head_dim] copies kept for the backward.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        half = x.shape[-1] // 2
        out = x * cos  # rotate_half(x) = cat(-x2, x1): each half takes the other's product with sin
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1.0)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        out = grad * cos
        out[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1.0)
        out[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        return out, None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim]."""
    return _RoPE.apply(x, cos[:, None, :], sin[:, None, :])


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int
) -> torch.Tensor:
    """Causal GQA attention of q ([T, H, D]) over k/v ([prefix_len + T, G, D]); returns [T, H*D].

    Query i (absolute position prefix_len + i) sees keys 0 .. prefix_len + i.
    """
    tokens, heads, head_dim = q.shape
    total = k.shape[0]
    groups = heads // k.shape[1]
    query_pos = torch.arange(tokens, device=q.device)[:, None] + prefix_len
    key_pos = torch.arange(total, device=q.device)[None, :]
    mask = key_pos <= query_pos
    # enable_gqa: the kernel maps query head h to key/value head h // groups (the layout of
    # transformers' repeat_kv) without materialising repeated keys; measured 1.4x faster than
    # repeat_interleave for a 63-row target piece over 575 keys (CPU, forward + backward).
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, enable_gqa=groups > 1)
    return out.transpose(0, 1).reshape(tokens, heads * head_dim)


@dataclass
class LayerOutput:
    out: torch.Tensor  # residual stream after the layer
    k_rot: torch.Tensor  # [T, G, D] keys after (norm and) RoPE: what later tokens attend to
    v: torch.Tensor  # [T, G, D]
    intermediates: LayerTensors | None = None  # what serving records for this layer


def project_qkv(
    xn: torch.Tensor, weights: LayerWeights, lora: dict[str, LoraPair], scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v: column views of one product with the stacked weight (:func:`stacked_linear`)."""
    bias = None if weights.q_bias is None else torch.cat([weights.q_bias, weights.k_bias, weights.v_bias])
    sizes = [weights.q.shape[0], weights.k.shape[0], weights.v.shape[0]]
    qkv = stacked_linear(xn, weights.qkv, bias, (lora.get("q_proj"), lora.get("k_proj"), lora.get("v_proj")),
                         scale, sizes)
    q, k, v = torch.split(qkv, sizes, dim=-1)
    return q, k, v


def project_gate_up(
    hn: torch.Tensor, weights: LayerWeights, lora: dict[str, LoraPair], scale: float
) -> torch.Tensor:
    """[rows, 2 * intermediate]: gate then up from one product with the stacked weight."""
    sizes = [weights.gate.shape[0], weights.up.shape[0]]
    return stacked_linear(hn, weights.gate_up, None, (lora.get("gate_proj"), lora.get("up_proj")), scale, sizes)


def rotate_k(
    k: torch.Tensor, weights: LayerWeights, geometry: ModelGeometry, cos: torch.Tensor, sin: torch.Tensor,
) -> torch.Tensor:
    """Flat k projection -> [T, kv_heads, D] after the optional per-head norm and RoPE."""
    k = k.view(k.shape[0], geometry.num_kv_heads, geometry.head_dim)
    if weights.k_norm is not None:
        k = rms_norm(k, weights.k_norm, geometry.rms_norm_eps)
    return apply_rope(k, cos, sin)


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor, weights: LayerWeights, geometry: ModelGeometry,
    cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat q/k projections -> [T, heads, D] after the optional per-head norm and RoPE."""
    q = q.view(q.shape[0], geometry.num_heads, geometry.head_dim)
    if weights.q_norm is not None:
        q = rms_norm(q, weights.q_norm, geometry.rms_norm_eps)
    return apply_rope(q, cos, sin), rotate_k(k, weights, geometry, cos, sin)


def decoder_layer(
    x: torch.Tensor,
    weights: LayerWeights,
    geometry: ModelGeometry,
    lora: dict[str, LoraPair],
    scale: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    keep_intermediates: bool = False,
    tp: TensorParallel | None = None,
) -> LayerOutput:
    eps = geometry.rms_norm_eps
    tp = active_tp(tp)
    lora = graph_lora(lora, tp, geometry)
    xn = rms_norm(x, weights.input_norm, eps)
    q, k, v = project_qkv(copy_to_tp(xn, tp), weights, lora, scale)
    q_rot, k_rot = rotate_qk(q, k, weights, geometry, cos, sin)
    v_heads = v.view(x.shape[0], geometry.num_kv_heads, geometry.head_dim)
    prefix_len = 0 if prefix_k is None else prefix_k.shape[0]
    keys = k_rot if prefix_k is None else torch.cat([prefix_k, k_rot])
    values = v_heads if prefix_v is None else torch.cat([prefix_v, v_heads])
    attn_out = attention(q_rot, keys, values, prefix_len)
    h = row_parallel_linear(attn_out, weights.o, lora.get("o_proj"), scale, tp).add_(x)  # x + o(attn_out)
    hn = copy_to_tp(rms_norm(h, weights.post_norm, eps), tp)
    gate_up = project_gate_up(hn, weights, lora, scale)
    gate, up = torch.split(gate_up, weights.gate.shape[0], dim=-1)
    out = row_parallel_linear(F.silu(gate) * up, weights.down, lora.get("down_proj"), scale, tp).add_(h)
    intermediates = None
    if keep_intermediates:
        intermediates = LayerTensors(x=x, q=q, k=k, v=v, attn_out=attn_out, h=h, gate_up=gate_up)
    return LayerOutput(out=out, k_rot=k_rot, v=v_heads, intermediates=intermediates)
