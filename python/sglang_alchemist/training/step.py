"""One sample's share of a training step, as a generator of resumable slices.

Read top to bottom, this is a LoRA forward and backward over ``prompt + target`` in which the
prompt is never run forward where serving already did it:

1. Forward, layer by layer, of the rows that have no record. Prompt rows recorded by serving
   (see ``memory/``) cost nothing: their keys/values are read from the record. Rows without
   one are *filled*: a no-grad forward of just those rows attending to the rows before them
   (``replay.fill_rows``), which produces the values serving would have recorded. Those are
   prompt rows never recorded, evicted, the earlier assistant turns of a conversation (decode
   records nothing), every prompt row when the sample must be recomputed - and always the
   target rows, which follow the prompt as one more unrecorded run.
2. Head: the prompt's last final hidden state predicts the first target token, the target
   rows' final hidden states the rest; the objective's loss is back-propagated to them.
3. Backward, layer by layer in reverse: every row - recorded prompt rows, filled prompt rows
   and target rows alike - by the replay (``replay.replay_rows_backward``) from its record.
   In the last layer, the prompt rows before the last one feed nothing trained (the head reads
   the last prompt row and the target rows): only their keys' and values' backward runs
   (``replay.replay_key_rows_backward``; slice kind ``replay_keys``).

**The frozen trunk.** With the adapter on layers ``k..L-1`` only (``adapter.first_layer``), layers
below ``k`` never change, so the residual entering layer ``k`` of every row (prompt and target)
is the same for every version, pass and item: ``Example.trunk``, when the trainer has it
(``training/trunk.py``), replaces the forward of layers ``0..k-1`` entirely. Without it those
layers run forward only (no record kept: nothing below ``k`` is trained), replaying the prompt
rows serving recorded (any version: the trunk is the base model's), and the residual reaching
layer ``k`` is handed back (``SampleResult.trunk``) for every later use. The backward stops at
layer ``k``. In the adapted layers the serving record is replayed only where it is *exact*
(``Example.record_exact``: made by the very weights being trained); otherwise every row is
filled from the trunk.

Why the target rows are filled and replayed rather than run through autograd: one replay over
``P + T`` rows does the target rows' backward in the same large products as the prompt's
(a separate autograd graph of the few target rows ran small, slow matrix products and kept a
graph per layer), and the no-grad forward keeps only the record. The gradients are the same
(the replay is the layer's exact backward for any rows whose record the current weights made).

**Slices.** The function is a generator that yields after each piece of work, so the trainer
can pause between any two of them while SGLang serves; the filled records and the gradients
live in the sample's state in between (no autograd graph outlives a slice). A piece is a run of
rows of one layer, sized by a :class:`SlicePlanner` (the scheduler's cost model) so that it fits
the time training is given; with the default planner a piece is a whole layer. Rows are cut
afresh for each layer. LoRA gradients accumulate in the adapter's ``.grad``. Autograd is enabled only inside a slice, never across a
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
from sglang_alchemist.training.layers import rms_norm
from sglang_alchemist.training.lora import LoraAdapter
from sglang_alchemist.training.model_spec import FrozenModel
from sglang_alchemist.training.objectives import Teacher, objective_loss
from sglang_alchemist.training.replay import (
    fill_rows,
    recompute_layer_record,
    replay_key_rows_backward,
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
TARGET_FORWARD = "target_forward"  # filling the target rows (no grad; they attend to every prompt row)
HEAD = "head"
REPLAY_BACKWARD = "replay_backward"  # prompt and target rows, from their records
REPLAY_KEYS = "replay_keys"  # last layer's prompt rows but the last: only their keys/values' backward
SLICE_KINDS = (PROMPT_FORWARD, TARGET_FORWARD, HEAD, REPLAY_BACKWARD, REPLAY_KEYS)


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
    # the residual entering the first adapted layer, every row (prompt + target stream): [N, hidden]
    trunk: torch.Tensor | None = None
    # ``activations`` were made by the weights being trained: replay them in the adapted layers too
    # (False: they serve the trunk's layers only)
    record_exact: bool = True

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
    # "replay": some prompt rows replayed from serving's exact record in the adapted layers;
    # "trunk": every row entered the adapted layers from the trunk's record; "recompute": neither
    path: str
    rows_replayed: int = 0  # prompt rows replayed from serving's exact record in the adapted layers
    rows_filled: int = 0  # prompt rows the trainer computed in the adapted layers
    layers_recomputed: int = 0  # hedging: layers recomputed from their input during a replay
    layers_reloaded: int = 0  # hedging: layers whose record came back from the host tier
    peak_filled_bytes: int = 0  # the trainer's own record of the filled rows, at its largest
    slices: list[SliceInfo] = field(default_factory=list)
    # reuse: row-layer forwards the sample needed (rows x layers) and how many came from records
    layer_rows: int = 0
    layer_rows_reused: int = 0
    trunk: torch.Tensor | None = None  # the residual entering the first adapted layer, when computed here
    # per target token: the model's greedy prediction equals it, and by how much (logit margin over
    # the best other token); None under tensor parallelism (sharded logits)
    agree: list[bool] | None = None
    margins: list[float] | None = None
    staleness: int | None = None  # versions behind the trained weights of the record replayed (0: exact)


def sample_step(
    model: FrozenModel,
    adapter: LoraAdapter,
    example: Example,
    loss_scale: float,
    hedge: HedgePolicy | None = None,
    planner: SlicePlanner | None = None,
    tp: TensorParallel | None = None,
    forward_only: bool = False,
) -> Generator[SliceInfo, None, SampleResult]:
    """Forward and backward of one sample, yielding after each slice (see the module doc).

    ``tp``: this rank's tensor-parallel group; ``model``/``adapter``/``example.activations`` are
    then the rank's shards, and every rank of the group runs the same sample in lockstep.
    ``forward_only``: stop after the head (the loss and the greedy agreement, no gradient): the
    learning recipe's check of whether the model already gives the target.
    """
    tp = active_tp(tp)
    planner = planner or WholeLayers()
    if tp is not None and not isinstance(planner, WholeLayers):  # a cost model's answers differ by rank
        planner = AgreedPlanner(planner, tp)
    state = _SampleState(model, adapter, example, loss_scale, hedge, planner, tp, forward_only)
    first, layers = adapter.first_layer, model.geometry.num_layers
    if example.trunk is None:
        for layer in range(first):  # the frozen trunk, forward only
            yield from state.forward_layer(layer, keep=False)
    state.enter_adapted_layers(first)
    for layer in range(first, layers):
        yield from state.forward_layer(layer)
    yield from state.head()
    if forward_only:
        return state.result
    for layer in reversed(range(first, layers)):
        yield from state.backward_layer(layer, need_input_grad=layer > first)
    return state.result


def _pieces(start: int, end: int, size: int) -> list[tuple[int, int]]:
    size = max(1, size)
    return [(a, min(end, a + size)) for a in range(start, end, size)]


class _SampleState:
    """The filled record rows and the gradients of one sample between its slices.

    Rows are the prompt's ``P`` positions followed by the target stream's ``S`` (every target
    token but the last, which is only a label): ``N = P + S`` rows, one sequence. The stream is
    one more unrecorded run, filled like a prompt hole and replayed with the prompt rows.
    """

    def __init__(self, model: FrozenModel, adapter: LoraAdapter, example: Example, loss_scale: float,
                 hedge: HedgePolicy | None, planner: SlicePlanner, tp: TensorParallel | None = None,
                 forward_only: bool = False) -> None:
        self.model, self.adapter, self.example = model, adapter, example
        self.loss_scale, self.hedge, self.planner, self.tp = loss_scale, hedge, planner, tp
        self.forward_only = forward_only
        device = model.device
        self.prompt = torch.tensor(example.prompt_ids, device=device)
        self.targets = torch.tensor(example.target_ids, device=device)
        self.num_prompt, self.num_target = len(example.prompt_ids), len(example.target_ids)
        self.stream_len = self.num_target - 1  # the last target token is only a label
        self.num_rows = self.num_prompt + self.stream_len
        self.cos, self.sin = model.rotary_cos_sin(torch.arange(self.num_rows))
        self.activations = example.activations
        recorded = self.activations.segments() if self.activations is not None else []
        # The rows as ordered runs: (start, end, recorded?); the stream is the last, unrecorded
        self.runs: list[tuple[int, int, bool]] = []
        position = 0
        for start, end in recorded:
            if start > position:
                self.runs.append((position, start, False))
            self.runs.append((start, end, True))
            position = end
        if position < self.num_prompt:
            self.runs.append((position, self.num_prompt, False))
        if self.stream_len:
            self.runs.append((self.num_prompt, self.num_rows, False))
        self.result = SampleResult(loss=0.0, target_tokens=self.num_target, path="recompute",
                                   layer_rows=self.num_rows * model.geometry.num_layers)
        # filled rows: the residual entering the current layer, and each layer's record rows
        if example.trunk is None:
            self.fill_x = {start: embed_tokens(model, self._ids(start, end), tp) for start, end, rec in self.runs
                           if not rec}
        self.filled: dict[int, dict[int, LayerTensors]] = {}
        self._filled_bytes = 0
        self.grad_rows: torch.Tensor | None = None  # gradient of the current layer's output residual
        self.live_from = 0  # rows before it have a zero ``grad_rows`` (only the last layer's, see head)

    def _ids(self, start: int, end: int) -> torch.Tensor:
        if start >= self.num_prompt:
            return self.targets[start - self.num_prompt : end - self.num_prompt]
        return self.prompt[start:end]

    def _note(self, info: SliceInfo) -> SliceInfo:
        self.result.slices.append(info)
        return info

    def _layer_lora(self, layer: int):
        return self.adapter.layer(layer), self.adapter.spec.scale

    # ---- 1. forward ------------------------------------------------------------------------

    def forward_layer(self, layer: int, keep: bool = True) -> Generator[SliceInfo, None, None]:
        """One layer's forward of every unrecorded run; ``keep``: hold its record for the backward."""
        model, geometry = self.model, self.model.geometry
        weights = model.layers[layer]
        lora, scale = self._layer_lora(layer)
        keys: list[torch.Tensor] = []  # rotated keys/values of the rows so far, in order
        values: list[torch.Tensor] = []
        filled: dict[int, LayerTensors] = {}
        for run_start, run_end, recorded in self.runs:
            if recorded:
                kv = self.activations.load(layer, ("k", "v"), run_start, run_end)
                k_rot, v = rotated_keys_values(kv["k"], kv["v"], weights, geometry,
                                               self.cos[run_start:run_end], self.sin[run_start:run_end])
                keys.append(k_rot)
                values.append(v)
                continue
            kind = TARGET_FORWARD if run_start >= self.num_prompt else PROMPT_FORWARD
            x_run = self.fill_x[run_start]
            outputs, records = [], []
            size = self.planner.rows(kind, layer, run_end - run_start, run_end)
            for start, end in _pieces(run_start, run_end, size):
                prefix_k = _joined(keys)
                prefix_v = _joined(values)
                output = fill_rows(
                    x_run[start - run_start : end - run_start], weights, geometry, lora, scale,
                    self.cos[start:end], self.sin[start:end], prefix_k, prefix_v, self.tp,
                )
                keys.append(output.k_rot)
                values.append(output.v)
                outputs.append(output.out)
                records.append(output.intermediates)
                yield self._note(SliceInfo(kind, layer, end - start, end))
            if keep:
                filled[run_start] = _cat_records(records)
            self.fill_x[run_start] = torch.cat(outputs)
        if not keep:
            return
        self.filled[layer] = filled
        self._filled_bytes += sum(record.nbytes for record in filled.values())
        self.result.peak_filled_bytes = max(self.result.peak_filled_bytes, self._filled_bytes)

    def enter_adapted_layers(self, first: int) -> None:
        """Rows reach the first adapted layer: from the trunk's record, or the trunk's forward just run.

        Serving's record stays in use from here on only where it is exact; every other row is
        filled from its residual at this layer.
        """
        result, trunk, geometry = self.result, self.example.trunk, self.model.geometry
        recorded = [(start, end) for start, end, rec in self.runs if rec]
        recorded_rows = sum(end - start for start, end in recorded)
        if trunk is not None:
            result.layer_rows_reused += self.num_rows * first
        else:
            result.layer_rows_reused += recorded_rows * first  # their trunk layers were serving's
            if first > 0:  # the residual now entering layer ``first``, kept for every later use
                parts = [self.activations.load(first, ("x",), start, end)["x"] if rec else self.fill_x[start]
                         for start, end, rec in self.runs]
                trunk = result.trunk = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        if recorded and self.example.record_exact:
            result.path, result.rows_replayed = "replay", recorded_rows
            result.layer_rows_reused += recorded_rows * (geometry.num_layers - first)
            if self.example.trunk is not None:
                self.fill_x = {start: trunk[start:end] for start, end, rec in self.runs if not rec}
        else:
            if self.example.trunk is not None:
                result.path = "trunk"
            self.runs = [(0, self.num_prompt, False)] + (
                [(self.num_prompt, self.num_rows, False)] if self.stream_len else [])
            if trunk is not None:
                self.fill_x = {start: trunk[start:end] for start, end, _ in self.runs}
            elif recorded:  # no trunk (every layer adapted): the recorded rows start from their embeddings
                self.fill_x = {start: embed_tokens(self.model, self._ids(start, end), self.tp)
                               for start, end, _ in self.runs}
        result.rows_filled = self.num_prompt - result.rows_replayed
        self.last_prompt_run = next(run for run in reversed(self.runs) if run[0] < self.num_prompt)

    # ---- 2. head -----------------------------------------------------------------------------

    def head(self) -> Generator[SliceInfo, None, None]:
        model, geometry = self.model, self.model.geometry
        last_start, _, recorded_last = self.last_prompt_run
        last = self.activations.final_hidden() if recorded_last else self.fill_x[last_start][-1:]
        rows = [last] + ([self.fill_x[self.num_prompt]] if self.stream_len else [])
        leaves = [row.detach().requires_grad_() for row in rows]  # predicting targets[0], targets[1:]
        size = self.planner.rows(HEAD, geometry.num_layers, self.num_target, self.num_target)
        total_loss = 0.0
        agree: list[bool] | None = None if self.tp is not None else []
        margins: list[float] = []
        for start, end in _pieces(0, self.num_target, size):
            with torch.set_grad_enabled(not self.forward_only):
                hidden = torch.cat(leaves)[start:end]
                normed = rms_norm(hidden, model.final_norm, geometry.rms_norm_eps)
                targets = self.targets[start:end]
                if self.tp is None:
                    logits = normed @ model.lm_head.t()
                    teacher = self.example.teacher
                    loss = objective_loss(self.example.objective, logits, targets,
                                          teacher.rows(start, end).to(logits.device) if teacher else None)
                    margin = _target_margins(logits.detach(), targets)
                    agree += (margin > 0).tolist()
                    margins += margin.tolist()
                else:  # the rank's vocab columns; the loss comes out whole on every rank
                    logits = copy_to_tp(normed, self.tp) @ model.lm_head.t()
                    # Sharded logits have no top-k teacher: a distilled rehearsal trains the base
                    # model's greedy answer (its targets) by cross-entropy instead.
                    objective = "sft" if self.example.objective == "distill" else self.example.objective
                    loss = vocab_parallel_objective_loss(objective, logits, targets, model.vocab_start, self.tp)
                loss = loss * self.example.weight
                if not self.forward_only:
                    (loss * self.loss_scale).backward()
            total_loss += float(loss.detach())
            yield self._note(SliceInfo(HEAD, geometry.num_layers, end - start, 0))
        self.result.loss = total_loss
        self.result.agree, self.result.margins = agree, (margins if agree is not None else None)
        if self.forward_only:
            return
        self.grad_rows = torch.zeros(self.num_rows, geometry.hidden_size, dtype=model.dtype, device=model.device)
        self.grad_rows[self.num_prompt - 1 : self.num_prompt] = leaves[0].grad
        if self.stream_len:
            self.grad_rows[self.num_prompt:] = leaves[1].grad
        # The head reads the last prompt row and the target rows: the last layer's earlier rows
        # get gradient only through their keys/values (replay_key_rows_backward)
        self.live_from = self.num_prompt - 1
        self.fill_x = {}  # the last layer's outputs: read by the head only

    # ---- 3. backward -----------------------------------------------------------------------

    def backward_layer(self, layer: int, need_input_grad: bool = True) -> Generator[SliceInfo, None, None]:
        model, geometry = self.model, self.model.geometry
        kv_shape = (self.num_rows, geometry.num_kv_heads, geometry.head_dim)
        grad_k = torch.zeros(kv_shape, dtype=model.dtype, device=model.device)
        grad_v = torch.zeros(kv_shape, dtype=model.dtype, device=model.device)
        record = self._layer_record(layer)
        weights = model.layers[layer]
        lora, scale = self._layer_lora(layer)
        k_rot, v = rotated_keys_values(record.k, record.v, weights, geometry, self.cos, self.sin)
        grad_below = torch.empty_like(self.grad_rows) if need_input_grad else None
        live_from = self.live_from
        size = self.planner.rows(REPLAY_BACKWARD, layer, self.num_rows - live_from, self.num_rows)
        for start, end in reversed(_pieces(live_from, self.num_rows, size)):
            grad_x = replay_rows_backward(
                record, start, end, weights, geometry, lora, scale, self.cos, self.sin, k_rot, v,
                self.grad_rows[start:end], grad_k, grad_v, need_input_grad=need_input_grad, tp=self.tp,
            )
            if grad_below is not None:
                grad_below[start:end] = grad_x
            yield self._note(SliceInfo(REPLAY_BACKWARD, layer, end - start, end))
        if live_from:  # rows whose output gradient is zero: their keys/values only, after every query
            size = self.planner.rows(REPLAY_KEYS, layer, live_from, 0)
            for start, end in reversed(_pieces(0, live_from, size)):
                grad_x = replay_key_rows_backward(
                    record, start, end, weights, geometry, lora, scale, self.cos, self.sin, grad_k, grad_v,
                    need_input_grad=need_input_grad, tp=self.tp,
                )
                if grad_below is not None:
                    grad_below[start:end] = grad_x
                yield self._note(SliceInfo(REPLAY_KEYS, layer, end - start, 0))
        self.grad_rows, self.live_from = grad_below, 0
        self._filled_bytes -= sum(record.nbytes for record in self.filled.pop(layer).values())

    def _layer_record(self, layer: int) -> LayerTensors:
        """All rows of one layer's record: recorded rows (reloaded or recomputed) and filled."""
        activations, filled = self.activations, self.filled[layer]
        recorded = [(start, end) for start, end, rec in self.runs if rec]
        if recorded and layer > self.adapter.first_layer:
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
                                          self.cos, self.sin, self.tp)
        if recorded and not activations.on_device(layer):
            self.result.layers_reloaded += 1
        parts = [LayerTensors.from_dict(activations.load(layer, LAYER_TENSORS, s, e)) if rec else filled[s]
                 for s, e, rec in self.runs]
        return parts[0] if len(parts) == 1 else _cat_records(parts)


def _target_margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row: the target's logit minus the best other token's (> 0: greedy decoding picks the target)."""
    logits = logits.float()
    target = logits.gather(-1, targets[:, None])[:, 0]
    other = logits.scatter(-1, targets[:, None], float("-inf")).amax(-1)
    return target - other


def _joined(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The rows so far as one tensor; a single part as it is (``torch.cat`` would copy it)."""
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
