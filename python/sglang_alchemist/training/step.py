"""One sample's share of a training step, as a generator of resumable slices.

Read top to bottom, this is a LoRA forward and backward over ``prompt + target`` in which the
prompt is never run forward where serving already did it:

1. Forward, layer by layer.
   - **Prompt rows.** Rows with a record (recorded by serving, see ``memory/``) cost nothing:
     their keys/values are read from the record. Rows without one - never recorded, evicted,
     the earlier assistant turns of a conversation (decode records nothing), or every row when
     the sample must be recomputed - are *filled*: a no-grad forward of just those rows
     attending to the rows before them (``replay.fill_rows``), which produces the values serving
     would have recorded.
   - **Target rows** run a normal differentiable forward that attends to the prompt's
     keys/values. Each layer's graph is kept, cut at its inputs (leaf tensors), so the backward
     can proceed one layer at a time.
2. Head: the prompt's last final hidden state predicts the first target token, the target
   rows' final hidden states the rest; the objective's loss is back-propagated to them.
3. Backward, layer by layer in reverse: the target rows' graphs first (giving the gradient of
   the layer below and of the prompt's keys/values), then the prompt rows by the replay
   (``replay.replay_rows_backward``), from the record - recorded rows and filled rows alike.

**Slices.** The function is a generator that yields after each piece of work, so the trainer
can pause between any two of them while SGLang serves; the graph lives in the sample's state in
between. A piece is a run of rows of one layer, sized by a :class:`SlicePlanner` (the
scheduler's cost model) so that it fits the time training is given; with the default planner a
piece is a whole layer. The target rows are cut into the same pieces in every layer (their
graphs are linked across layers); prompt rows are cut afresh for each layer. LoRA gradients
accumulate in the adapter's ``.grad``. Autograd is enabled only inside a slice, never across a
yield (SGLang's loop runs under ``no_grad``).

Every cut gives the same gradients: the forward of a piece attends to all keys before it, and
the backward of a piece adds its key/value gradients to accumulators that earlier pieces read.

**Tensor parallelism** (``tp``): ``model``, ``adapter`` and the record are one rank's shards
(``tensor_parallel``); every rank runs this generator on the same sample and the layers run
their collectives. The embedding lookup and the head are vocab-parallel. The two rank-local
choices - slice sizes and reload-vs-recompute - are agreed on across ranks first, so every rank
runs the same slices and the same collectives.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from sglang_alchemist.memory.records import LAYER_TENSORS, LayerTensors
from sglang_alchemist.training.layers import decoder_layer, rms_norm
from sglang_alchemist.training.lora import LoraAdapter
from sglang_alchemist.training.model_spec import FrozenModel
from sglang_alchemist.training.objectives import Teacher, objective_loss
from sglang_alchemist.training.replay import (
    backward_from,
    fill_rows,
    recompute_layer_record,
    replay_rows_backward,
    rotated_keys_values,
)
from sglang_alchemist.training.tensor_parallel import (
    AgreedPlanner,
    TensorParallel,
    active_tp,
    copy_to_tp,
    embed_tokens,
    vocab_parallel_objective_loss,
)

# The kinds of slice (the scheduler's cost model learns one rate per kind).
PROMPT_FORWARD = "prompt_forward"  # filling prompt rows that have no record (no grad)
TARGET_FORWARD = "target_forward"
HEAD = "head"
TARGET_BACKWARD = "target_backward"
REPLAY_BACKWARD = "replay_backward"
SLICE_KINDS = (PROMPT_FORWARD, TARGET_FORWARD, HEAD, TARGET_BACKWARD, REPLAY_BACKWARD)


class RecordedActivations(Protocol):
    """A sample's recorded prompt rows (``memory.samples.SampleActivations`` implements it)."""

    num_tokens: int

    def segments(self) -> list[tuple[int, int]]:
        """The recorded prompt positions as sorted, disjoint ``[start, end)`` runs."""

    def load(self, layer: int, names: tuple[str, ...], start: int, end: int) -> dict[str, torch.Tensor]:
        """Tensors of one layer for positions ``[start, end)`` (inside one segment), on the device."""

    def prefetch(self, layer: int, names: tuple[str, ...]) -> None:
        """Start bringing a layer's tensors to the device (no-op when already there)."""

    def on_device(self, layer: int) -> bool:
        ...

    def host_bytes(self, layer: int, names: tuple[str, ...]) -> int:
        ...

    def final_hidden(self) -> torch.Tensor | None:
        """[1, hidden]: the residual after the last layer at the last prompt token, if recorded."""


class HedgePolicy(Protocol):
    def recompute_layer(self, activations: RecordedActivations, layer: int) -> bool:
        """True: recompute this layer from its recorded input instead of reloading its record."""


class SlicePlanner(Protocol):
    def rows(self, kind: str, layer: int, total: int, context: int) -> int:
        """How many of ``total`` rows the next slice of ``kind`` takes (``context``: keys they see)."""


class WholeLayers:
    """The default planner: every slice is a whole layer (tests, benchmarks, idle training)."""

    def rows(self, kind: str, layer: int, total: int, context: int) -> int:
        return total


@dataclass
class Example:
    """One feedback sample, ready to train."""

    prompt_ids: list[int]
    target_ids: list[int]
    objective: str = "sft"
    weight: float = 1.0
    activations: RecordedActivations | None = None  # None: every prompt row is filled
    teacher: Teacher | None = None  # the ``distill`` objective's base distributions, one row per target

    @property
    def num_target_tokens(self) -> int:
        return len(self.target_ids)


@dataclass
class SliceInfo:
    """What a slice did, for the scheduler's cost model and metrics."""

    kind: str  # one of SLICE_KINDS (the lane adds "optimizer" and "publish")
    layer: int
    rows: int  # rows computed in this slice
    context: int = 0  # keys the slice's rows attend to (attention cost grows with it)


@dataclass
class SampleResult:
    loss: float
    target_tokens: int
    path: str  # "replay" (some prompt rows replayed from records) or "recompute" (none)
    rows_replayed: int = 0  # prompt rows whose record came from serving
    rows_filled: int = 0  # prompt rows computed by the trainer
    layers_recomputed: int = 0  # hedging: layers recomputed from their input during a replay
    layers_reloaded: int = 0  # hedging: layers whose record came back from the host tier
    peak_filled_bytes: int = 0  # the trainer's own record of the filled rows, at its largest
    slices: list[SliceInfo] = field(default_factory=list)


def sample_step(
    model: FrozenModel,
    adapter: LoraAdapter,
    example: Example,
    loss_scale: float,
    hedge: HedgePolicy | None = None,
    planner: SlicePlanner | None = None,
    tp: TensorParallel | None = None,
) -> Generator[SliceInfo, None, SampleResult]:
    """Forward and backward of one sample, yielding after each slice (see the module doc).

    ``tp``: this rank's tensor-parallel group; ``model``/``adapter``/``example.activations`` are
    then the rank's shards, and every rank of the group runs the same sample in lockstep.
    """
    tp = active_tp(tp)
    planner = planner or WholeLayers()
    if tp is not None and not isinstance(planner, WholeLayers):  # a cost model's answers differ by rank
        planner = AgreedPlanner(planner, tp)
    state = _SampleState(model, adapter, example, loss_scale, hedge, planner, tp)
    for layer in range(model.geometry.num_layers):
        yield from state.forward_layer(layer)
    yield from state.head()
    for layer in reversed(range(model.geometry.num_layers)):
        yield from state.backward_layer(layer)
    return state.result


def _pieces(start: int, end: int, size: int) -> list[tuple[int, int]]:
    size = max(1, size)
    return [(a, min(end, a + size)) for a in range(start, end, size)]


@dataclass
class _TargetPiece:
    """One run of target rows in one layer: its graph, cut at its inputs."""

    start: int  # row within the target stream
    end: int
    stream_in: torch.Tensor  # leaf
    out: torch.Tensor
    k_rot: torch.Tensor  # this piece's keys/values (graph roots)
    v: torch.Tensor
    k_leaf: torch.Tensor  # detached copies later pieces attend to: they collect those gradients
    v_leaf: torch.Tensor


class _SampleState:
    """The graph, the filled record rows and the gradients of one sample between its slices."""

    def __init__(self, model: FrozenModel, adapter: LoraAdapter, example: Example, loss_scale: float,
                 hedge: HedgePolicy | None, planner: SlicePlanner, tp: TensorParallel | None = None) -> None:
        self.model, self.adapter, self.example = model, adapter, example
        self.loss_scale, self.hedge, self.planner, self.tp = loss_scale, hedge, planner, tp
        device = model.device
        self.prompt = torch.tensor(example.prompt_ids, device=device)
        self.targets = torch.tensor(example.target_ids, device=device)
        self.num_prompt, self.num_target = len(example.prompt_ids), len(example.target_ids)
        self.stream_len = self.num_target - 1  # the last target token is only a label
        cos, sin = model.rotary_cos_sin(torch.arange(self.num_prompt + self.stream_len))
        self.prompt_cos, self.prompt_sin = cos[: self.num_prompt], sin[: self.num_prompt]
        self.stream_cos, self.stream_sin = cos[self.num_prompt :], sin[self.num_prompt :]
        self.activations = example.activations
        recorded = self.activations.segments() if self.activations is not None else []
        # The prompt as ordered runs: (start, end, recorded?)
        self.runs: list[tuple[int, int, bool]] = []
        position = 0
        for start, end in recorded:
            if start > position:
                self.runs.append((position, start, False))
            self.runs.append((start, end, True))
            position = end
        if position < self.num_prompt:
            self.runs.append((position, self.num_prompt, False))
        rows_replayed = sum(end - start for start, end in recorded)
        self.result = SampleResult(
            loss=0.0, target_tokens=self.num_target, path="replay" if rows_replayed else "recompute",
            rows_replayed=rows_replayed, rows_filled=self.num_prompt - rows_replayed,
        )
        # filled rows: the residual entering the current layer, and each layer's record rows
        self.fill_x = {start: embed_tokens(model, self.prompt[start:end], tp) for start, end, rec in self.runs
                       if not rec}
        self.filled: list[dict[int, LayerTensors]] = []
        self._filled_bytes = 0
        self.filled_final: torch.Tensor | None = None
        # target rows: one piece partition for every layer (their graphs link across layers)
        piece_rows = planner.rows(TARGET_BACKWARD, -1, self.stream_len, self.num_prompt + self.stream_len)
        self.target_pieces = _pieces(0, self.stream_len, piece_rows)
        self.stream = [embed_tokens(model, self.targets[a:b], tp) for a, b in self.target_pieces]
        self.target_graph: list[list[_TargetPiece]] = []
        self.prompt_kv_leaves: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.grad_stream: list[torch.Tensor | None] = []
        self.grad_prompt: torch.Tensor | None = None

    def _note(self, info: SliceInfo) -> SliceInfo:
        self.result.slices.append(info)
        return info

    def _layer_lora(self, layer: int):
        return self.adapter.layer(layer), self.adapter.spec.scale

    # ---- 1. forward ------------------------------------------------------------------------

    def forward_layer(self, layer: int) -> Generator[SliceInfo, None, None]:
        model, geometry = self.model, self.model.geometry
        weights = model.layers[layer]
        lora, scale = self._layer_lora(layer)
        keys: list[torch.Tensor] = []  # rotated keys/values of the prompt rows, in order
        values: list[torch.Tensor] = []
        filled: dict[int, LayerTensors] = {}
        for run_start, run_end, recorded in self.runs:
            if recorded:
                kv = self.activations.load(layer, ("k", "v"), run_start, run_end)
                k_rot, v = rotated_keys_values(kv["k"], kv["v"], weights, geometry,
                                               self.prompt_cos[run_start:run_end], self.prompt_sin[run_start:run_end])
                keys.append(k_rot)
                values.append(v)
                continue
            x_run = self.fill_x[run_start]
            outputs, records = [], []
            size = self.planner.rows(PROMPT_FORWARD, layer, run_end - run_start, run_end)
            for start, end in _pieces(run_start, run_end, size):
                prefix_k = torch.cat(keys) if keys else None
                prefix_v = torch.cat(values) if values else None
                output = fill_rows(
                    x_run[start - run_start : end - run_start], weights, geometry, lora, scale,
                    self.prompt_cos[start:end], self.prompt_sin[start:end], prefix_k, prefix_v, self.tp,
                )
                keys.append(output.k_rot)
                values.append(output.v)
                outputs.append(output.out)
                records.append(output.intermediates)
                yield self._note(SliceInfo(PROMPT_FORWARD, layer, end - start, end))
            filled[run_start] = _cat_records(records)
            self.fill_x[run_start] = torch.cat(outputs)
        self.filled.append(filled)
        self._filled_bytes += sum(record.nbytes for record in filled.values())
        self.result.peak_filled_bytes = max(self.result.peak_filled_bytes, self._filled_bytes)
        if layer == geometry.num_layers - 1 and self.runs and not self.runs[-1][2]:
            self.filled_final = self.fill_x[self.runs[-1][0]][-1:]
        prompt_k = torch.cat(keys)
        prompt_v = torch.cat(values)
        if self.stream_len == 0:
            self.target_graph.append([])
            self.prompt_kv_leaves.append(None)
            return
        prefix_k = prompt_k.detach().requires_grad_()
        prefix_v = prompt_v.detach().requires_grad_()
        self.prompt_kv_leaves.append((prefix_k, prefix_v))
        pieces: list[_TargetPiece] = []
        for index, (start, end) in enumerate(self.target_pieces):
            with torch.enable_grad():
                stream_in = self.stream[index].detach().requires_grad_(layer > 0)
                keys_before = torch.cat([prefix_k, *[p.k_leaf for p in pieces]]) if pieces else prefix_k
                values_before = torch.cat([prefix_v, *[p.v_leaf for p in pieces]]) if pieces else prefix_v
                output = decoder_layer(
                    stream_in, weights, geometry, lora, scale, self.stream_cos[start:end],
                    self.stream_sin[start:end], keys_before, values_before, tp=self.tp,
                )
            pieces.append(_TargetPiece(
                start, end, stream_in, output.out, output.k_rot, output.v,
                output.k_rot.detach().requires_grad_(), output.v.detach().requires_grad_(),
            ))
            self.stream[index] = output.out
            yield self._note(SliceInfo(TARGET_FORWARD, layer, end - start, self.num_prompt + end))
        self.target_graph.append(pieces)

    # ---- 2. head -----------------------------------------------------------------------------

    def head(self) -> Generator[SliceInfo, None, None]:
        model, geometry = self.model, self.model.geometry
        recorded_last = self.runs[-1][2]
        last = self.activations.final_hidden() if recorded_last else self.filled_final
        rows = [last, *self.stream]  # hidden states predicting targets[0], targets[1:]
        leaves = [row.detach().requires_grad_() for row in rows]
        size = self.planner.rows(HEAD, geometry.num_layers, self.num_target, self.num_target)
        total_loss = 0.0
        for start, end in _pieces(0, self.num_target, size):
            with torch.enable_grad():
                hidden = torch.cat(leaves)[start:end]
                normed = rms_norm(hidden, model.final_norm, geometry.rms_norm_eps)
                if self.tp is None:
                    logits = normed @ model.lm_head.t()
                    teacher = self.example.teacher
                    loss = objective_loss(self.example.objective, logits, self.targets[start:end],
                                          teacher.rows(start, end).to(logits.device) if teacher else None)
                else:  # the rank's vocab columns; the loss comes out whole on every rank
                    logits = copy_to_tp(normed, self.tp) @ model.lm_head.t()
                    # Sharded logits have no top-k teacher: a distilled rehearsal trains the base
                    # model's greedy answer (its targets) by cross-entropy instead.
                    objective = "sft" if self.example.objective == "distill" else self.example.objective
                    loss = vocab_parallel_objective_loss(objective, logits, self.targets[start:end],
                                                         model.vocab_start, self.tp)
                loss = loss * self.example.weight
                (loss * self.loss_scale).backward()
            total_loss += float(loss.detach())
            yield self._note(SliceInfo(HEAD, geometry.num_layers, end - start, 0))
        self.result.loss = total_loss
        self.grad_stream = [leaf.grad for leaf in leaves[1:]]
        self.grad_prompt = torch.zeros(self.num_prompt, geometry.hidden_size, dtype=model.dtype, device=model.device)
        self.grad_prompt[-1:] = leaves[0].grad

    # ---- 3. backward -----------------------------------------------------------------------

    def backward_layer(self, layer: int) -> Generator[SliceInfo, None, None]:
        model, geometry = self.model, self.model.geometry
        kv_shape = (self.num_prompt, geometry.num_kv_heads, geometry.head_dim)
        leaves = self.prompt_kv_leaves[layer]
        pieces = self.target_graph[layer]
        for index in reversed(range(len(pieces))):
            piece = pieces[index]
            with torch.enable_grad():
                backward_from([(piece.out, self.grad_stream[index]), (piece.k_rot, piece.k_leaf.grad),
                               (piece.v, piece.v_leaf.grad)])
            self.grad_stream[index] = piece.stream_in.grad
            yield self._note(SliceInfo(TARGET_BACKWARD, layer, piece.end - piece.start,
                                       self.num_prompt + piece.end))
        self.target_graph[layer] = []  # free this layer's graph
        grad_k = leaves[0].grad if leaves is not None and leaves[0].grad is not None else None
        grad_v = leaves[1].grad if leaves is not None and leaves[1].grad is not None else None
        self.prompt_kv_leaves[layer] = None
        grad_k = torch.zeros(kv_shape, dtype=model.dtype, device=model.device) if grad_k is None else grad_k.clone()
        grad_v = torch.zeros(kv_shape, dtype=model.dtype, device=model.device) if grad_v is None else grad_v.clone()

        record = self._layer_record(layer)
        weights = model.layers[layer]
        lora, scale = self._layer_lora(layer)
        cos, sin = self.prompt_cos, self.prompt_sin
        k_rot, v = rotated_keys_values(record.k, record.v, weights, geometry, cos, sin)
        grad_below = torch.empty_like(self.grad_prompt) if layer > 0 else None
        size = self.planner.rows(REPLAY_BACKWARD, layer, self.num_prompt, self.num_prompt)
        for start, end in reversed(_pieces(0, self.num_prompt, size)):
            grad_x = replay_rows_backward(
                record, start, end, weights, geometry, lora, scale, cos, sin, k_rot, v,
                self.grad_prompt[start:end], grad_k, grad_v, need_input_grad=layer > 0, tp=self.tp,
            )
            if grad_below is not None:
                grad_below[start:end] = grad_x
            yield self._note(SliceInfo(REPLAY_BACKWARD, layer, end - start, end))
        self.grad_prompt = grad_below
        self._filled_bytes -= sum(record.nbytes for record in self.filled[layer].values())
        self.filled[layer] = {}

    def _layer_record(self, layer: int) -> LayerTensors:
        """All prompt rows of one layer's record: recorded rows (reloaded or recomputed) and filled."""
        activations, filled = self.activations, self.filled[layer]
        recorded = [(start, end) for start, end, rec in self.runs if rec]
        if recorded and layer > 0:
            activations.prefetch(layer - 1, LAYER_TENSORS)
        recompute = bool(recorded) and not activations.on_device(layer) and self.hedge is not None \
            and self.hedge.recompute_layer(activations, layer)
        if self.tp is not None and recorded and self.hedge is not None:
            recompute = self.tp.agree_any(recompute)  # a recompute runs collectives: all ranks or none
        if recompute:
            self.result.layers_recomputed += 1
            x = torch.cat([activations.load(layer, ("x",), s, e)["x"] if rec else filled[s].x
                           for s, e, rec in self.runs])
            lora, scale = self._layer_lora(layer)
            return recompute_layer_record(x, self.model.layers[layer], self.model.geometry, lora, scale,
                                          self.prompt_cos, self.prompt_sin, self.tp)
        if recorded and not activations.on_device(layer):
            self.result.layers_reloaded += 1
        parts = [LayerTensors.from_dict(activations.load(layer, LAYER_TENSORS, s, e)) if rec else filled[s]
                 for s, e, rec in self.runs]
        return parts[0] if len(parts) == 1 else _cat_records(parts)


def _cat_records(parts: list[LayerTensors]) -> LayerTensors:
    if len(parts) == 1:
        return parts[0]
    return LayerTensors(**{name: torch.cat([getattr(p, name) for p in parts]) for name in LAYER_TENSORS})


def run_to_completion(generator: Generator[SliceInfo, None, SampleResult]) -> SampleResult:
    """Drive a slice generator without pausing (tests, benchmarks)."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value
