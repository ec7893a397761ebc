"""Tensor-parallel training: each rank trains its shard of the LoRA adapter, as SGLang shards it.

SGLang (``srt/layers/linear.py``, ``srt/lora/layers.py``) cuts a Llama-family layer like
Megatron; the trainer's shard of each projection and of its LoRA pair is exactly the one SGLang
serves on that rank, so what a rank trains is what it serves:

===================  ==================================  ===============================================
projection           base weight on rank ``r``           LoRA on rank ``r`` (SGLang's ``slice_lora_*``)
===================  ==================================  ===============================================
q_proj               rows of heads ``r*H/W ..``          A full (replicated), B rows sliced like the base
k_proj, v_proj       rows of KV shard ``r // replicas``  A full, B rows of that KV shard
gate_proj, up_proj   rows ``r*I/W ..`` each              A full, B rows sliced
o_proj, down_proj    input columns sliced                A input columns sliced, B full (replicated)
embed, lm_head       vocab rows of the rank (padded)     - (not trained)
norms, rotary        replicated                          -
===================  ==================================  ===============================================

The residual stream (``x``, ``h``, the layer output) is replicated: a row-parallel projection's
output is all-reduced (base output and, separately, the rank-r LoRA-A partial ``x_shard
A_shard^T`` before ``B``, as SGLang's ``forward_with_base`` does). So a rank's record holds
``x``/``h`` whole and ``q``/``k``/``v``/``attn_out``/``gate_up`` as its own shards.

The backward is Megatron's. Where the collectives sit (all over the :class:`TensorParallel`
group; the forward ones exist in serving too, the backward ones are the training's own):

- :func:`copy_to_tp` (identity forward, all-reduce backward) on the input of every
  column-parallel group (``xn`` before q/k/v, ``hn`` before gate/up, the final norm's output
  before the vocab-parallel lm_head): each rank's input gradient is the partial sum over its
  output rows, the full one is their sum.
- :func:`copy_to_tp` on the *replicated* LoRA A of each column-parallel projection: each rank's
  ``dA`` comes from its B rows only; the all-reduce makes every rank's ``A.grad`` the full
  gradient (so replicated parameters get identical gradients and stay identical).
- :func:`reduce_from_tp` (all-reduce forward, identity backward) on a row-parallel projection's
  base output and on its LoRA-A partial; the replicated ``B`` then gets its full gradient
  locally (its input, the reduced partial, and its output gradient are both replicated).
- With fewer KV heads than ranks, a KV head's ``k``/``v`` LoRA B rows live on several ranks
  that each see only their own query heads' gradient: :func:`_KVReplicaSum` sums ``dB`` over
  those ranks.
- The head is vocab-parallel (:func:`vocab_parallel_objective_loss`): global max and sum of
  exponentials and the target logit are all-reduced ([tokens] each); no rank ever holds the
  full logits. The embedding lookup masks the ids outside the rank's vocab rows and all-reduces.

Attention is per head and stays local (``replay.attention_backward`` on the rank's heads).

Every rank runs the same program on the same sample, so the collectives match one to one; the
only rank-local decisions inside a step - slice sizes from the scheduler's planner and the
hedging choice reload vs recompute - are agreed on by a collective first (:class:`AgreedPlanner`,
:meth:`TensorParallel.agree_any`). With ``tp=None`` (or a world of one rank) nothing here runs.

The group: in the server it must be a *dedicated* gloo group for the training thread (see
:meth:`TensorParallel.new_group`), never SGLang's own TP group, which the serving thread uses
concurrently. Checkpoints stay full PEFT adapters: :func:`gather_peft_state_dict` assembles the
shards, :func:`scatter_peft_state_dict` cuts a full one (SGLang's loader slices it the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from sglang_alchemist.training.lora import LoraAdapter, module_shapes
from sglang_alchemist.training.model_spec import (
    FrozenModel,
    LayerWeights,
    ModelGeometry,
    UnsupportedModelError,
)

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
VOCAB_PADDING = 64  # SGLang's DEFAULT_VOCAB_PADDING_SIZE


@dataclass(frozen=True, eq=False)
class TensorParallel:
    """This rank's place in the training's tensor-parallel group."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None  # None: the default group

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def new_group(cls, ranks: list[int] | None = None, timeout_s: float = 600.0) -> TensorParallel:
        """A gloo group of its own over ``ranks`` (default: all) of the initialised default group.

        ``torch.distributed.new_group`` is collective: every rank of the default group calls it, in
        the same order as its other ``new_group`` calls (in the server: once, at start-up, from the
        scheduler process before the training thread starts).
        """
        ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
        group = dist.new_group(ranks, backend="gloo", timeout=timedelta(seconds=timeout_s))
        return cls(rank=ranks.index(dist.get_rank()), world_size=len(ranks), group=group)

    # --- plain collectives (all ranks call them in the same order) --------------------------

    def all_reduce_(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return parts

    def agree_min(self, value: int) -> int:
        """The smallest of the ranks' values (every rank gets it)."""
        tensor = torch.tensor([int(value)], dtype=torch.int64)
        return int(self.all_reduce_(tensor, op=dist.ReduceOp.MIN).item())

    def agree_any(self, flag: bool) -> bool:
        """True on every rank when it is True on any."""
        tensor = torch.tensor([int(bool(flag))], dtype=torch.int64)
        return bool(self.all_reduce_(tensor, op=dist.ReduceOp.MAX).item())


def active_tp(tp: TensorParallel | None) -> TensorParallel | None:
    """``tp`` when it spans more than one rank, else None (one rank: the plain code path)."""
    return tp if tp is not None and tp.world_size > 1 else None


# --- Megatron's autograd-aware collectives ----------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # a copy: autograd may hand the same gradient tensor to other consumers
        return ctx.tp.all_reduce_(grad.clone(memory_format=torch.contiguous_format)), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return tp.all_reduce_(x.clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _KVReplicaSum(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks holding the same KV shard."""

    @staticmethod
    def forward(ctx, x, tp, replicas):
        ctx.tp, ctx.replicas = tp, replicas
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        tp, replicas = ctx.tp, ctx.replicas
        parts = tp.all_gather(grad)
        shard = tp.rank // replicas
        return sum(parts[p] for p in range(shard * replicas, (shard + 1) * replicas)), None, None


def copy_to_tp(x: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient in backward (input of a column-parallel op)."""
    tp = active_tp(tp)
    return x if tp is None else _CopyToTP.apply(x, tp)


def reduce_from_tp(x: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """All-reduce forward, identity backward (output of a row-parallel op)."""
    tp = active_tp(tp)
    return x if tp is None else _ReduceFromTP.apply(x, tp)


def graph_lora(lora: dict, tp: TensorParallel | None, geometry: ModelGeometry) -> dict:
    """A layer's LoRA pairs as the rank's graph must use them (module doc).

    Column-parallel: the replicated A through :func:`copy_to_tp` (its gradient all-reduced), and
    with KV replicas, the k/v B through :class:`_KVReplicaSum`. Row-parallel pairs are used as they
    are (``layers.row_parallel_linear`` reduces their A-partial). Call it where the graph is built.
    """
    tp = active_tp(tp)
    if tp is None:
        return lora
    pairs = {}
    for module, (a, b) in lora.items():
        if module in COLUMN_PARALLEL:
            a = _CopyToTP.apply(a, tp)
            if module in ("k_proj", "v_proj") and geometry.kv_head_replicas > 1:
                b = _KVReplicaSum.apply(b, tp, geometry.kv_head_replicas)
        pairs[module] = (a, b)
    return pairs


# --- vocab-parallel embedding and objectives --------------------------------------------------


def embed_tokens(model: FrozenModel, ids: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """Embedding rows of ``ids``: a plain lookup, or SGLang's vocab-parallel one (mask + all-reduce)."""
    tp = active_tp(tp)
    if tp is None:
        return model.embed[ids]
    rows = model.embed.shape[0]
    local = ids - model.vocab_start
    outside = (local < 0) | (local >= rows)
    out = model.embed[local.clamp(0, max(rows - 1, 0))].masked_fill(outside[:, None], 0)
    return tp.all_reduce_(out.contiguous())


class _VocabParallelTargetLogProb(torch.autograd.Function):
    """log p(target) per row from the rank's logit columns [vocab_start, vocab_start + V_r)."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, tp):
        logits32 = logits.float()
        row_max = logits32.max(dim=-1).values
        tp.all_reduce_(row_max, op=dist.ReduceOp.MAX)
        exp = torch.exp(logits32 - row_max[:, None])
        local = targets - vocab_start
        inside = (local >= 0) & (local < logits.shape[-1])
        local = local.clamp(0, logits.shape[-1] - 1)
        picked = logits32.gather(-1, local[:, None])[:, 0].masked_fill(~inside, 0.0)
        sums = tp.all_reduce_(torch.stack([exp.sum(-1), picked]))
        total, target_logit = sums[0], sums[1]
        ctx.save_for_backward(exp.div_(total[:, None]), local, inside)
        ctx.logits_dtype = logits.dtype
        return target_logit - row_max - torch.log(total)

    @staticmethod
    def backward(ctx, grad):
        softmax, local, inside = ctx.saved_tensors
        grad_logits = softmax * -grad[:, None]
        rows = torch.arange(local.shape[0], device=local.device)
        grad_logits[rows[inside], local[inside]] += grad[inside]
        return grad_logits.to(ctx.logits_dtype), None, None, None


def vocab_parallel_objective_loss(
    name: str, logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, tp: TensorParallel
) -> torch.Tensor:
    """``objectives.objective_loss`` from vocab-sharded logits (same formulas; summed over tokens)."""
    log_prob = _VocabParallelTargetLogProb.apply(logits, targets, vocab_start, tp)
    if name == "sft":
        return -log_prob.sum()
    if name == "unlikelihood":
        return -torch.log1p(-log_prob.exp().clamp(max=1.0 - 1e-6)).sum()
    from sglang_alchemist.training.objectives import OBJECTIVES

    raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")


class AgreedPlanner:
    """A slice planner whose answers all ranks share (the smallest): same slices, same collectives."""

    def __init__(self, planner, tp: TensorParallel) -> None:
        self.planner, self.tp = planner, tp

    def rows(self, kind: str, layer: int, total: int, context: int) -> int:
        return self.tp.agree_min(self.planner.rows(kind, layer, total, context))


# --- how SGLang shards the model and the adapter ---------------------------------------------


def _pad(size: int, to: int) -> int:
    return (size + to - 1) // to * to


@dataclass(frozen=True)
class ShardLayout:
    """Which rows/columns of each full tensor rank ``rank`` of ``world_size`` holds (SGLang's cut)."""

    geometry: ModelGeometry  # the full model's
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        g, w = self.geometry, self.world_size
        if g.num_heads % w or g.intermediate_size % w:
            raise UnsupportedModelError(
                f"tensor parallelism {w} must divide the heads ({g.num_heads}) and intermediate size "
                f"({g.intermediate_size})"
            )
        if g.num_kv_heads % w and w % g.num_kv_heads:
            raise UnsupportedModelError(f"tensor parallelism {w} and {g.num_kv_heads} KV heads: neither divides")

    @classmethod
    def of(cls, geometry: ModelGeometry, tp: TensorParallel | None) -> ShardLayout:
        return cls(geometry, 0, 1) if tp is None else cls(geometry, tp.rank, tp.world_size)

    @property
    def heads(self) -> int:
        return self.geometry.num_heads // self.world_size

    @property
    def kv_replicas(self) -> int:  # SGLang's num_kv_head_replicas
        return max(1, self.world_size // self.geometry.num_kv_heads)

    @property
    def kv_heads(self) -> int:
        return max(1, self.geometry.num_kv_heads // self.world_size)

    @property
    def kv_shard(self) -> int:  # SGLang: kv_tp_rank // num_kv_head_replicas
        return self.rank // self.kv_replicas

    @property
    def intermediate(self) -> int:
        return self.geometry.intermediate_size // self.world_size

    def q_rows(self) -> slice:
        size = self.heads * self.geometry.head_dim
        return slice(self.rank * size, (self.rank + 1) * size)

    def kv_rows(self) -> slice:
        size = self.kv_heads * self.geometry.head_dim
        return slice(self.kv_shard * size, (self.kv_shard + 1) * size)

    def intermediate_rows(self) -> slice:
        return slice(self.rank * self.intermediate, (self.rank + 1) * self.intermediate)

    def vocab_rows(self) -> slice:
        """The real (unpadded) vocabulary rows of the rank, as VocabParallelEmbedding cuts them."""
        vocab, w = self.geometry.vocab_size, self.world_size
        padding = VOCAB_PADDING if _pad(vocab, VOCAB_PADDING) % w == 0 else VOCAB_PADDING * w
        per_rank = _pad(vocab, padding) // w
        return slice(min(self.rank * per_rank, vocab), min((self.rank + 1) * per_rank, vocab))

    def local_geometry(self) -> ModelGeometry:
        return replace(
            self.geometry, num_heads=self.heads, num_kv_heads=self.kv_heads,
            intermediate_size=self.intermediate, kv_head_replicas=self.kv_replicas,
        )

    def lora_a_columns(self, module: str) -> slice | None:
        """Columns of the full LoRA A the rank holds; None: all (replicated)."""
        return {"o_proj": self.q_rows(), "down_proj": self.intermediate_rows()}.get(module)

    def lora_b_rows(self, module: str) -> slice | None:
        """Rows of the full LoRA B the rank holds; None: all (replicated)."""
        if module == "q_proj":
            return self.q_rows()
        if module in ("k_proj", "v_proj"):
            return self.kv_rows()
        if module in ("gate_proj", "up_proj"):
            return self.intermediate_rows()
        return None

    def peft_index(self, name: str) -> tuple[slice, ...]:
        """Index of the rank's shard in the full tensor of a PEFT name (``...q_proj.lora_A.weight``)."""
        module, kind = name.split(".")[-3], name.split(".")[-2]
        if kind == "lora_A":
            columns = self.lora_a_columns(module)
            return (slice(None), columns if columns is not None else slice(None))
        rows = self.lora_b_rows(module)
        return (rows if rows is not None else slice(None), slice(None))


def shard_model(full: FrozenModel, tp: TensorParallel) -> FrozenModel:
    """The rank's shard of a whole ``FrozenModel``, cut as SGLang's TP model holds it (tests, benchmarks).

    In the server the shard comes from SGLang's own parameters: ``qkv_proj.weight`` is already
    ``[q_r; k_r; v_r]``, ``gate_up_proj.weight`` ``[gate_r; up_r]``, ``o_proj``/``down_proj`` hold
    their input columns, the embedding/lm_head their vocab rows (padded: the first
    ``vocab_rows`` are real).
    """
    layout = ShardLayout.of(full.geometry, tp)
    geometry = layout.local_geometry()
    q_rows, kv_rows, inter = layout.q_rows(), layout.kv_rows(), layout.intermediate_rows()

    def bias(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
        return None if tensor is None else tensor[rows].contiguous()

    layers = []
    for w in full.layers:
        qkv = torch.cat([w.q[q_rows], w.k[kv_rows], w.v[kv_rows]]).contiguous()
        gate_up = torch.cat([w.gate[inter], w.up[inter]]).contiguous()
        q, k, v = torch.split(qkv, [geometry.q_size, geometry.kv_size, geometry.kv_size])
        gate, up = torch.split(gate_up, [geometry.intermediate_size] * 2)
        layers.append(LayerWeights(
            input_norm=w.input_norm, q=q, k=k, v=v, qkv=qkv,
            o=w.o[:, q_rows].contiguous(), post_norm=w.post_norm,
            gate=gate, up=up, gate_up=gate_up, down=w.down[:, inter].contiguous(),
            q_bias=bias(w.q_bias, q_rows), k_bias=bias(w.k_bias, kv_rows), v_bias=bias(w.v_bias, kv_rows),
            q_norm=w.q_norm, k_norm=w.k_norm,
        ))
    vocab = layout.vocab_rows()
    embed = full.embed[vocab].contiguous()
    lm_head = embed if full.lm_head is full.embed else full.lm_head[vocab].contiguous()
    return FrozenModel(geometry=geometry, embed=embed, layers=layers, final_norm=full.final_norm,
                       lm_head=lm_head, rotary=full.rotary, vocab_start=vocab.start)


# --- the adapter: shards <-> full PEFT checkpoints -------------------------------------------


def scatter_peft_state_dict(
    state: dict[str, torch.Tensor], geometry: ModelGeometry, tp: TensorParallel | None
) -> dict[str, torch.Tensor]:
    """The rank's shard of each tensor of a full PEFT adapter (as SGLang's LoRA loader slices it)."""
    layout = ShardLayout.of(geometry, tp)
    return {name: tensor[layout.peft_index(name)].contiguous().clone() for name, tensor in state.items()}


def gather_peft_state_dict(
    state: dict[str, torch.Tensor], geometry: ModelGeometry, tp: TensorParallel | None
) -> dict[str, torch.Tensor]:
    """The full PEFT tensors from every rank's shards (collective: every rank gets them all).

    Works for weights and for gradients (``LoraAdapter.peft_grad_dict``). One all-gather of all
    shards flattened (the shards of a name have one shape on every rank).
    """
    tp = active_tp(tp)
    if tp is None:
        return {name: tensor.clone() for name, tensor in state.items()}
    names = sorted(state)
    flat = torch.cat([state[name].detach().to("cpu", torch.float32).reshape(-1) for name in names])
    parts = tp.all_gather(flat)
    shapes = module_shapes(geometry)
    full = {}
    for name in names:
        module, kind = name.split(".")[-3], name.split(".")[-2]
        out_features, in_features = shapes[module]
        rank = state[name].shape[0] if kind == "lora_A" else state[name].shape[1]
        full[name] = torch.empty((rank, in_features) if kind == "lora_A" else (out_features, rank),
                                 dtype=state[name].dtype)
    for source, part in enumerate(parts):
        layout = ShardLayout(geometry, source, tp.world_size)
        offset = 0
        for name in names:
            count = state[name].numel()
            full[name][layout.peft_index(name)] = part[offset : offset + count].view(state[name].shape)
            offset += count
    return full


def shard_adapter(full: LoraAdapter, tp: TensorParallel | None, device: torch.device | str = "cpu") -> LoraAdapter:
    """The rank's shard of a whole adapter (every rank starts from the same full adapter)."""
    layout = ShardLayout.of(full.geometry, tp)
    local = LoraAdapter(full.spec, layout.local_geometry(), device=device)
    local.load_peft_state_dict(scatter_peft_state_dict(full.peft_state_dict(), full.geometry, tp))
    return local


def gather_adapter(local: LoraAdapter, geometry: ModelGeometry, tp: TensorParallel | None) -> LoraAdapter:
    """The whole adapter from the ranks' shards (collective); ``.save_peft`` it on one rank."""
    full = LoraAdapter(local.spec, geometry)
    full.load_peft_state_dict(gather_peft_state_dict(local.peft_state_dict(), geometry, tp))
    return full


def grad_norm(adapter: LoraAdapter, geometry: ModelGeometry, tp: TensorParallel | None) -> float:
    """The whole adapter's gradient 2-norm from a shard (collective): sharded tensors summed over
    ranks, replicated ones counted once."""
    tp = active_tp(tp)
    layout = ShardLayout.of(geometry, tp)
    sharded, replicated = 0.0, 0.0
    for layer in adapter.params:
        for module, (a, b) in layer.items():
            for param, index in ((a, layout.lora_a_columns(module)), (b, layout.lora_b_rows(module))):
                if param.grad is None:
                    continue
                square = float(param.grad.detach().float().pow(2).sum())
                if param is b and module in ("k_proj", "v_proj") and layout.rank % layout.kv_replicas:
                    continue  # a KV shard's B is held by kv_replicas ranks: count it on the first
                if index is None:
                    replicated += square
                else:
                    sharded += square
    if tp is not None:
        sharded = float(tp.all_reduce_(torch.tensor([sharded], dtype=torch.float64)).item())
    return math.sqrt(sharded + replicated)


def clip_grad_norm_(adapter: LoraAdapter, max_norm: float, geometry: ModelGeometry,
                    tp: TensorParallel | None) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over the whole adapter, applied to the rank's shard."""
    total = grad_norm(adapter, geometry, tp)
    factor = max_norm / (total + 1e-6)
    if factor < 1.0:
        for param in adapter.parameters():
            if param.grad is not None:
                param.grad.mul_(factor)
    return total
