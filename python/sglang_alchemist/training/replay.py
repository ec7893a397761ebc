"""The replay: back-propagate through a prompt layer from its recorded values, no forward.

For a prompt token, serving already computed every value of the layer. The backward needs
those values, not the computation, so each expensive op becomes an autograd function whose
forward *returns the recorded output* and whose backward is the op's real backward:

- ``_ReplayedLinear`` (frozen projection ``y = x W^T``): forward returns the record,
  backward ``dx = dy W``; it also forms the LoRA ``u = x A^T`` and takes ``du A`` into the same
  ``dx``. The LoRA part is added by ``_ReplayedLoraUp``: zero in value (the output stays
  exactly the record, which already contains the served adapter's contribution) while its
  backward is the LoRA path's, giving the LoRA gradients and their share of ``dx``. Only the
  rank-r products are computed (:func:`_replayed_projections` puts the two together).
- ``_ReplayedSum`` (residual adds): forward returns the recorded sum; backward passes ``dy`` to
  both inputs.
- The prompt's self-attention is not an autograd op at all: :func:`attention_backward` is its
  math backward, run explicitly between the two halves of the layer (below), recomputing the
  softmax from recorded q and k one block of queries at a time (no log-sum-exp is needed).

Cheap elementwise ops (RMSNorm, RoPE, Qwen3's q/k norms, SiLU·up) are recomputed from
recorded inputs and differentiated by autograd (RMSNorm and RoPE through the written-out
backwards of ``layers``).

**Rows.** :func:`replay_rows_backward` back-propagates the rows ``[a, b)`` of a prompt layer,
so a layer's backward can be cut into slices that fit between serving batches. Processed from
the last rows to the first, each call does, for its rows:

1. the *post-attention half* (o_proj, residual, MLP) from the gradient of the rows' outputs:
   gives the gradient of their attention output and the residual share of their input's;
2. the attention backward of their queries over keys ``[0, b)`` (causal), adding the gradients
   of all those keys and values into the layer's accumulators - rows after ``b`` were done
   before, so the rows' own key/value gradients are complete once this step ends;
3. the *pre-attention half* (input norm, q/k/v projections, RoPE) from the gradients of their
   queries, keys and values: gives the norm share of their input's gradient.

The LoRA gradients of all seven projections accumulate in the adapter's ``.grad``. With
``[a, b) = [0, P)`` it is the whole layer in one piece; any cut gives the same gradients.

**Tensor parallelism** (``tp``): the record is the rank's (``x``/``h`` whole, the rest its
shards) and so are the weights and LoRA pairs. The collectives of ``tensor_parallel`` go where
Megatron puts them: the inputs of the column-parallel q/k/v and gate/up (``xn``, ``hn``) get
their gradients all-reduced, and so do the replicated LoRA A of those projections; the
row-parallel o/down LoRA A-partial is all-reduced in the rebuilt forward (the replicated B's
gradient needs it); the replayed row-parallel base outputs need nothing (their input gradient
``dy W_shard`` is the rank's own). The attention backward is per head: local.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sglang_alchemist.memory.records import LayerTensors
from sglang_alchemist.training.layers import (
    LoraPair,
    decoder_layer,
    rms_norm,
    rotate_k,
    rotate_qk,
)
from sglang_alchemist.training.model_spec import LayerWeights, ModelGeometry
from sglang_alchemist.training.tensor_parallel import (
    TensorParallel,
    active_tp,
    copy_to_tp,
    graph_lora,
    reduce_from_tp,
)

ATTENTION_QUERY_BLOCK = 128  # measured fastest on CPU (cache-sized score tiles)


class _ReplayedLinear(torch.autograd.Function):
    """Outputs = recorded slices of ``x W^T`` along the output dim; backward = ``sum_i dy_i W_i``.

    One product per output slice rather than one product with concatenated gradients: the
    same arithmetic without copying the (large) gradients into one tensor.

    With ``a`` (the LoRA A of these projections, stacked), one more output ``u = x A^T``
    ([rows, r]), whose share of ``dx`` (``du A``) is accumulated into the same tensor as the
    base products' (no [rows, in] product and sum of its own), and ``dA = du^T x``. The rank-r
    products run with ``r`` as their first dim: the memory-bound [r, rows] x [rows, n] form is
    2.5-4x faster on CPU than the [n, rows] x [rows, r] one autograd would pick for ``dA``
    (575 rows, n = 576 / 1536, 2 threads; docs/NOTES.md, "Replay kernels, third pass"), and
    ``u`` is the transpose of ``A x^T`` for the same reason.
    """

    @staticmethod
    def forward(ctx, x, weight, a, *values):
        ctx.weight_rows = torch.split(weight, [value.shape[-1] for value in values], dim=0)
        outputs = tuple(value.view_as(value) for value in values)
        if a is not None:
            ctx.save_for_backward(x, a)
            outputs += ((a.to(x.dtype) @ x.t()).t(),)
        return outputs if len(outputs) > 1 else outputs[0]

    @staticmethod
    def backward(ctx, *grads):
        lora = bool(ctx.saved_tensors)
        grad_u = grads[-1] if lora else None
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            for grad, rows in zip(grads[: len(ctx.weight_rows)], ctx.weight_rows, strict=True):
                if grad is not None:  # accumulate in place: no second [rows, in] tensor, no extra pass
                    grad = grad.to(rows.dtype)
                    grad_x = grad @ rows if grad_x is None else grad_x.addmm_(grad, rows)
        if grad_u is not None:
            x, a = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                grad_u_x = grad_u.to(x.dtype)
                grad_x = grad_u_x @ a.to(x.dtype) if grad_x is None else grad_x.addmm_(grad_u_x, a.to(x.dtype))
            if ctx.needs_input_grad[2]:
                grad_a = (grad_u.t().to(x.dtype) @ x).to(a.dtype)
        return (grad_x, None, grad_a, *([None] * (len(grads) - lora)))


class _ReplayedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, None


class _ReplayedLoraUp(torch.autograd.Function):
    """The LoRA up-projection added to a replayed output: value unchanged, gradient the real one.

    ``forward(replayed, u, b, scale)`` returns ``replayed`` (the record already holds the served
    adapter's contribution); the backward is that of ``replayed + scale * u B^T``: ``grad`` to
    ``replayed``, ``scale * grad B`` to ``u`` and ``scale * grad^T u`` to ``B``. Written out
    rather than as ``delta - delta.detach()`` because that form materialises four
    [rows, out] tensors per projection (the delta, its scaled copy, the difference and the sum)
    that the replay never reads: memory passes and a [rows, r] x [r, out] product per projection
    (docs/NOTES.md, "The replay", "Profile"). Only [rows, r] and [out, r] are computed, each as
    the transpose of a product whose *first* operand has the rank's ``r`` rows (:class:`_ReplayedLinear`
    says why).
    """

    @staticmethod
    def forward(ctx, replayed, u, b, scale):
        ctx.save_for_backward(u, b)
        ctx.scale = scale
        return replayed.view_as(replayed)

    @staticmethod
    def backward(ctx, grad):
        u, b = ctx.saved_tensors
        grad_u = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_u = (b.t() @ grad.to(b.dtype).t()).t().mul_(ctx.scale).to(u.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (u.t() @ grad.to(u.dtype)).t().mul_(ctx.scale).to(b.dtype)
        return grad, grad_u, grad_b, None


def _replayed_projections(
    x: torch.Tensor, weight: torch.Tensor, values: tuple[torch.Tensor, ...], pairs: tuple[LoraPair | None, ...],
    scale: float, row_tp: TensorParallel | None = None,
) -> tuple[torch.Tensor, ...]:
    """Replayed projections of one input (``values``: their recorded outputs, in ``weight``'s
    row order) with their LoRA paths' gradients, the recorded values unchanged (module doc).

    The LoRA down-projections of all of them run as one product with the A matrices stacked, so
    the backward reads ``x`` once for their A gradients and adds their share of ``dx`` into the
    base products' (:class:`_ReplayedLinear`). ``row_tp``: a row-parallel projection (o/down)
    under tensor parallelism, whose A-partial ``u`` is all-reduced before B.
    """
    live = [index for index, pair in enumerate(pairs) if pair is not None]
    if not live:
        outputs = _ReplayedLinear.apply(x, weight, None, *values)
        return outputs if isinstance(outputs, tuple) else (outputs,)
    stacked = pairs[live[0]][0] if len(live) == 1 else torch.cat([pairs[index][0] for index in live])
    *outputs, u_all = _ReplayedLinear.apply(x, weight, stacked, *values)
    if active_tp(row_tp) is not None:
        u_all = reduce_from_tp(u_all, row_tp)
    us = torch.split(u_all, [pairs[index][0].shape[0] for index in live], dim=-1)
    for index, u in zip(live, us, strict=True):
        outputs[index] = _ReplayedLoraUp.apply(outputs[index], u, pairs[index][1], scale)
    return tuple(outputs)


def _unread_output(rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """The forward value of a replayed op whose recorded output is used instead.

    ``_ReplayedLinear``/``_ReplayedSum`` return the recorded tensor and only need the shape of
    what they stand for; an expanded zero costs no memory.
    """
    return like.new_zeros(1, 1).expand(rows, width)


def attention_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
    query_offset: int, query_block: int = ATTENTION_QUERY_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Math backward of causal GQA attention for a run of queries over all keys before them.

    q: [c, H, D] rotated queries at positions ``query_offset .. query_offset + c``; k, v:
    [query_offset + c, G, D] (k rotated) at positions 0..; out, grad_out: [c, H*D]. Returns
    dq [c, H, D] and dk, dv [query_offset + c, G, D]. The heads sharing a key/value head are
    stacked into one product (no repeated keys are materialised); the softmax is recomputed per
    block of queries from q and k, and ``D_i = sum(dO_i * O_i)`` uses the recorded output.

    One key/value head at a time, with 2-D products: a batched product over the G heads splits
    its batch between threads (3 heads on 2 threads: one idles a third of the time), a 2-D one
    splits its rows, and a [n*block, keys] score tile of one head stays in a core's cache for the
    softmax and the elementwise passes (18 -> 13 ms for 575 rows of SmolLM2, CPU, 2 threads).
    """
    rows, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    per_group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    compute = torch.float32
    # [G, n, c, D]: head h = g * n + i shares key/value head g (transformers' repeat_kv layout)
    # The softmax scale is folded into q (and so into every score and into dk, which is formed
    # from q); dq gets it once at the end. Exact for power-of-two scales such as 1/sqrt(64).
    q_g = (q.to(compute) * scale).view(rows, kv_heads, per_group, head_dim).permute(1, 2, 0, 3)
    out_g = out.to(compute).view(rows, kv_heads, per_group, head_dim).permute(1, 2, 0, 3)
    grad_out_g = grad_out.to(compute).view(rows, kv_heads, per_group, head_dim).permute(1, 2, 0, 3)
    k_g = k.to(compute).transpose(0, 1).contiguous()  # [G, keys, D]
    v_g = v.to(compute).transpose(0, 1).contiguous()
    row_dot = (grad_out_g * out_g).sum(-1, keepdim=True)  # [G, n, c, 1]
    grad_q = torch.empty_like(q_g)
    grad_k = torch.zeros_like(k_g)
    grad_v = torch.zeros_like(v_g)
    # Only a block's last `block` keys can lie after one of its queries: the mask touches those.
    hidden = torch.ones(query_block, query_block, dtype=torch.bool, device=q.device).triu_(1)
    for group in range(kv_heads):
        keys, values = k_g[group], v_g[group]
        for start in range(0, rows, query_block):
            end = min(rows, start + query_block)
            block = end - start
            visible = query_offset + end  # keys 0 .. visible-1 can be seen by some query of the block
            q_block = q_g[group, :, start:end].reshape(per_group * block, head_dim)
            grad_block = grad_out_g[group, :, start:end].reshape(per_group * block, head_dim)
            scores = q_block @ keys[:visible].t()  # [n*block, visible], scaled
            scores.view(per_group, block, visible)[..., visible - block:].masked_fill_(
                hidden[:block, :block], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            grad_v[group, :visible].addmm_(probs.t(), grad_block)  # in place: no temporary
            grad_probs = grad_block @ values[:visible].t()
            grad_scores = probs.mul_(grad_probs.sub_(row_dot[group, :, start:end].reshape(per_group * block, 1)))
            grad_q[group, :, start:end] = (grad_scores @ keys[:visible]).view(per_group, block, head_dim)
            grad_k[group, :visible].addmm_(grad_scores.t(), q_block)  # q_block carries the scale
    grad_q.mul_(scale)
    return (
        grad_q.permute(2, 0, 1, 3).reshape(rows, heads, head_dim).to(q.dtype),
        grad_k.transpose(0, 1).to(k.dtype),
        grad_v.transpose(0, 1).to(v.dtype),
    )


def rotated_keys_values(
    record_k: torch.Tensor, record_v: torch.Tensor, weights: LayerWeights, geometry: ModelGeometry,
    cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys after (norm and) RoPE and values, [rows, kv_heads, head_dim], from recorded k and v."""
    k_rot = rotate_k(record_k, weights, geometry, cos, sin)
    return k_rot, record_v.view(record_v.shape[0], geometry.num_kv_heads, geometry.head_dim)


def replay_rows_backward(
    record: LayerTensors,
    start: int,
    end: int,
    weights: LayerWeights,
    geometry: ModelGeometry,
    lora: dict[str, LoraPair],
    scale: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_rot: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    grad_k: torch.Tensor,
    grad_v: torch.Tensor,
    need_input_grad: bool,
    tp: TensorParallel | None = None,
) -> torch.Tensor | None:
    """Back-propagate rows ``[start, end)`` of one prompt layer from its record (module doc).

    ``record``: the layer's tensors for all prompt rows; ``cos``/``sin``: rotary tables of all
    prompt rows; ``k_rot``/``v``: the rotated keys and values of all rows ([P, G, D], values,
    no graph); ``grad_out``: gradient of the rows' output residual ([end-start, hidden]);
    ``grad_k``/``grad_v``: the layer's key/value gradient accumulators ([P, G, D], post-RoPE),
    updated in place for keys ``[0, end)``. Returns the gradient of the rows' input residual,
    or None when ``need_input_grad`` is False (layer 0: nothing below it is trained).
    With ``tp``, every rank calls it for the same rows (it runs collectives).
    """
    eps = geometry.rms_norm_eps
    rows = end - start
    span = slice(start, end)
    tp = active_tp(tp)
    with torch.enable_grad():
        lora = graph_lora(lora, tp, geometry)
        # 1. post-attention half: o_proj, residual, MLP
        x = record.x[span].detach().requires_grad_(need_input_grad)
        attn_out = record.attn_out[span].detach().requires_grad_()
        (attn_proj,) = _replayed_projections(
            attn_out, weights.o, (_unread_output(rows, geometry.hidden_size, x),), (lora.get("o_proj"),), scale, tp)
        h = _ReplayedSum.apply(x, attn_proj, record.h[span])
        hn = copy_to_tp(rms_norm(h, weights.post_norm, eps), tp)
        gate, up = _replayed_projections(
            hn, weights.gate_up, torch.split(record.gate_up[span], geometry.intermediate_size, dim=-1),
            (lora.get("gate_proj"), lora.get("up_proj")), scale,
        )
        gated = F.silu(gate) * up
        (down,) = _replayed_projections(
            gated, weights.down, (_unread_output(rows, geometry.hidden_size, x),), (lora.get("down_proj"),), scale, tp)
        out = _ReplayedSum.apply(h, down, _unread_output(rows, geometry.hidden_size, x))
        out.backward(grad_out)

        # 2. attention backward of these queries over keys [0, end)
        xn = copy_to_tp(rms_norm(x, weights.input_norm, eps), tp)
        q, k, v_rows = _replayed_projections(
            xn, weights.qkv, (record.q[span], record.k[span], record.v[span]),
            (lora.get("q_proj"), lora.get("k_proj"), lora.get("v_proj")), scale,
        )
        q_rot, k_rot_rows = rotate_qk(q, k, weights, geometry, cos[span], sin[span])
        grad_q, grad_k_part, grad_v_part = attention_backward(
            q_rot.detach(), k_rot[:end], v[:end], record.attn_out[span], attn_out.grad, query_offset=start
        )
        grad_k[:end] += grad_k_part
        grad_v[:end] += grad_v_part

        # 3. pre-attention half: norm, q/k/v projections, RoPE
        v_heads = v_rows.view(rows, geometry.num_kv_heads, geometry.head_dim)
        backward_from([(q_rot, grad_q), (k_rot_rows, grad_k[span]), (v_heads, grad_v[span])])
    return x.grad if need_input_grad else None


def replay_key_rows_backward(
    record: LayerTensors,
    start: int,
    end: int,
    weights: LayerWeights,
    geometry: ModelGeometry,
    lora: dict[str, LoraPair],
    scale: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    grad_k: torch.Tensor,
    grad_v: torch.Tensor,
    need_input_grad: bool,
    tp: TensorParallel | None = None,
) -> torch.Tensor | None:
    """:func:`replay_rows_backward` for rows whose outputs carry no gradient: only their keys do.

    The last layer's prompt rows before the last one are read by nothing that is trained: the
    head reads the last prompt row and the target rows only. Their output gradient is exactly
    zero, so steps 1 and 2 (post-attention half, attention of their queries) would add zeros;
    what remains is the gradient their keys and values received from later queries (complete in
    ``grad_k``/``grad_v`` once the rows after ``end`` were replayed), back through RoPE, the k/v
    projections and the input norm. About a fifth of a layer's backward for those rows.
    """
    eps = geometry.rms_norm_eps
    span = slice(start, end)
    tp = active_tp(tp)
    with torch.enable_grad():
        lora = graph_lora(lora, tp, geometry)
        x = record.x[span].detach().requires_grad_(need_input_grad)
        xn = copy_to_tp(rms_norm(x, weights.input_norm, eps), tp)
        kv_weight = weights.qkv[record.q.shape[-1]:]  # the rows of k then v in the fused q/k/v weight
        k, v_rows = _replayed_projections(
            xn, kv_weight, (record.k[span], record.v[span]), (lora.get("k_proj"), lora.get("v_proj")), scale)
        k_rot_rows = rotate_k(k, weights, geometry, cos[span], sin[span])
        v_heads = v_rows.view(end - start, geometry.num_kv_heads, geometry.head_dim)
        backward_from([(k_rot_rows, grad_k[span]), (v_heads, grad_v[span])])
    return x.grad if need_input_grad else None


def backward_from(pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """One backward from the roots that carry a gradient and depend on something trainable.

    A root may not: with LoRA only on some projections, the first layer's keys depend on no
    trainable tensor at all.
    """
    live = [(root, grad) for root, grad in pairs if grad is not None and root.requires_grad]
    if live:
        torch.autograd.backward([root for root, _ in live], [grad for _, grad in live])


def fill_rows(
    x: torch.Tensor,
    weights: LayerWeights,
    geometry: ModelGeometry,
    lora: dict[str, LoraPair],
    scale: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    tp: TensorParallel | None = None,
):
    """Compute a run of prompt rows that has no record: the values serving would have recorded.

    A no-grad forward of the rows through one layer, attending to the keys/values of every row
    before them (``prefix_*``, rotated). Returns the layer output (``.out``), the rows' rotated
    keys and values, and their record (``.intermediates``), which the replay then uses like a
    recorded one. This is how unrecorded, evicted or stale prompt rows are trained: only the
    missing rows are computed, the rest stays replayed. With ``tp``: the rank's shard of the
    record (the forward's row-parallel all-reduces run; every rank calls it for the same rows).
    """
    with torch.no_grad():
        return decoder_layer(x, weights, geometry, lora, scale, cos, sin, prefix_k, prefix_v,
                             keep_intermediates=True, tp=tp)


def recompute_layer_record(
    x: torch.Tensor,
    weights: LayerWeights,
    geometry: ModelGeometry,
    lora: dict[str, LoraPair],
    scale: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    tp: TensorParallel | None = None,
) -> LayerTensors:
    """A whole prompt layer's record recomputed from its input (hedging: cheaper than a reload)."""
    return fill_rows(x, weights, geometry, lora, scale, cos, sin, None, None, tp).intermediates
