"""One sample's share of a training step, as a generator of resumable slices.

Read top to bottom, this is a LoRA forward and backward over ``prompt + target``:

1. Forward, layer by layer. The *target* tokens run a normal differentiable forward and attend
   to the prompt's keys/values of that layer. The *prompt* either
   - **replays**: its keys/values come from the activation record (no prompt compute at all), or
   - **recomputes**: it runs a normal differentiable forward too (the "separate trainer").
   Each layer's graph is kept separately, cut at its inputs (leaf tensors), so the backward
   can also proceed one layer at a time.
2. Head: the prompt's last final hidden state predicts the first target token, the target
   stream's final hidden states predict the rest; the objective's loss is back-propagated to
   those hidden states.
3. Backward, layer by layer in reverse: the target layer's graph first (giving the gradient of
   the layer below and of the prompt's keys/values), then the prompt layer - by the replay
   (``replay.replay_layer_backward``, from its record, which is loaded now and released after)
   or by autograd through the recomputed graph.

The function is a generator: it yields after every layer of the forward and of the backward,
so the scheduler can interleave serving batches between slices without losing any work (the
graph lives in the sample's state between slices). LoRA gradients accumulate in the adapter's
``.grad``. Autograd is enabled only inside a slice, never across a yield.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from sglang_alchemist.memory.records import LayerTensors
from sglang_alchemist.training.layers import decoder_layer, rms_norm
from sglang_alchemist.training.lora import LoraAdapter
from sglang_alchemist.training.model_spec import FrozenModel
from sglang_alchemist.training.objectives import objective_loss
from sglang_alchemist.training.replay import (
    backward_from,
    prompt_keys_values,
    recompute_layer_record,
    replay_layer_backward,
)


class RecordedActivations(Protocol):
    """A sample's recorded prompt activations (``memory.store.SampleActivations`` implements it)."""

    num_tokens: int

    def load(self, layer: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Tensors of one layer on the compute device (waits for a prefetch in flight)."""

    def prefetch(self, layer: int, names: tuple[str, ...]) -> None:
        """Start bringing a layer's tensors to the device (no-op when already there)."""

    def on_device(self, layer: int) -> bool:
        ...

    def host_bytes(self, layer: int, names: tuple[str, ...]) -> int:
        ...

    def final_hidden(self) -> torch.Tensor:
        """[1, hidden]: the residual after the last layer at the last prompt token."""


class HedgePolicy(Protocol):
    def recompute_layer(self, activations: RecordedActivations, layer: int) -> bool:
        """True: recompute this layer from its recorded input instead of reloading its record."""


BACKWARD_TENSORS = ("x", "q", "k", "v", "attn_out", "h", "gate_up")


@dataclass
class Example:
    """One feedback sample, ready to train."""

    prompt_ids: list[int]
    target_ids: list[int]
    objective: str = "sft"
    weight: float = 1.0
    activations: RecordedActivations | None = None  # None: recompute the prompt

    @property
    def num_target_tokens(self) -> int:
        return len(self.target_ids)


@dataclass
class SliceInfo:
    """What a slice did, for the scheduler's cost model and metrics."""

    phase: str  # "forward", "head", "backward"
    layer: int
    tokens: int  # tokens whose layer was computed in this slice (prompt replay counts 0 forward)


@dataclass
class SampleResult:
    loss: float
    target_tokens: int
    path: str  # "replay" or "recompute"
    layers_recomputed: int = 0  # hedging: layers recomputed from their input during a replay
    layers_reloaded: int = 0  # hedging: layers whose record came back from the host tier
    slices: list[SliceInfo] = field(default_factory=list)


def sample_step(
    model: FrozenModel,
    adapter: LoraAdapter,
    example: Example,
    loss_scale: float,
    hedge: HedgePolicy | None = None,
) -> Generator[SliceInfo, None, SampleResult]:
    """Forward and backward of one sample, yielding after each layer (see the module doc).

    Each slice enables autograd only while it computes: the generator is suspended between
    slices while SGLang serves (under ``no_grad``), so no grad mode may leak across a yield.
    """
    state = _SampleState(model, adapter, example, loss_scale, hedge)
    for layer in range(model.geometry.num_layers):
        with torch.enable_grad():
            state.forward_layer(layer)
        yield state.note(SliceInfo("forward", layer, state.forward_tokens))
    with torch.enable_grad():
        state.head()
    yield state.note(SliceInfo("head", model.geometry.num_layers, state.num_target))
    for layer in reversed(range(model.geometry.num_layers)):
        with torch.enable_grad():
            state.backward_layer(layer)
        yield state.note(SliceInfo("backward", layer, state.stream_len + state.num_prompt))
    return state.result


class _SampleState:
    """The graph and gradients of one sample between its slices."""

    def __init__(self, model: FrozenModel, adapter: LoraAdapter, example: Example, loss_scale: float,
                 hedge: HedgePolicy | None) -> None:
        self.model, self.adapter, self.example = model, adapter, example
        self.loss_scale, self.hedge = loss_scale, hedge
        device = model.device
        self.prompt = torch.tensor(example.prompt_ids, device=device)
        self.targets = torch.tensor(example.target_ids, device=device)
        self.num_prompt, self.num_target = len(example.prompt_ids), len(example.target_ids)
        self.stream_len = self.num_target - 1  # the last target token is only a label
        cos, sin = model.rotary_cos_sin(torch.arange(self.num_prompt + self.stream_len))
        self.prompt_cos, self.prompt_sin = cos[: self.num_prompt], sin[: self.num_prompt]
        self.stream_cos, self.stream_sin = cos[self.num_prompt :], sin[self.num_prompt :]
        self.activations = example.activations
        self.replay = self.activations is not None
        self.forward_tokens = self.stream_len + (0 if self.replay else self.num_prompt)
        self.result = SampleResult(loss=0.0, target_tokens=self.num_target,
                                   path="replay" if self.replay else "recompute")
        self.stream = model.embed[self.targets[: self.stream_len]]
        self.prompt_hidden = None if self.replay else model.embed[self.prompt]
        # per layer: (stream input, stream output, prompt keys, prompt values) as leaves/roots
        self.target_graph: list[tuple[torch.Tensor, ...] | None] = []
        # recompute path, per layer: (prompt input, prompt output, prompt keys, prompt values)
        self.prompt_graph: list[tuple[torch.Tensor, ...]] = []
        self.grad_stream: torch.Tensor | None = None
        self.grad_prompt: torch.Tensor | None = None

    def note(self, info: SliceInfo) -> SliceInfo:
        self.result.slices.append(info)
        return info

    # ---- 1. forward ------------------------------------------------------------------------

    def forward_layer(self, layer: int) -> None:
        model, geometry = self.model, self.model.geometry
        weights, lora, scale = model.layers[layer], self.adapter.layer(layer), self.adapter.spec.scale
        if self.replay:
            recorded = self.activations.load(layer, ("k", "v"))
            prompt_k, prompt_v = prompt_keys_values(
                recorded["k"], recorded["v"], weights, geometry, self.prompt_cos, self.prompt_sin
            )
        else:
            prompt_in = self.prompt_hidden.detach().requires_grad_(layer > 0)
            output = decoder_layer(prompt_in, weights, geometry, lora, scale, self.prompt_cos, self.prompt_sin)
            self.prompt_graph.append((prompt_in, output.out, output.k_rot, output.v))
            prompt_k, prompt_v, self.prompt_hidden = output.k_rot, output.v, output.out
        if self.stream_len == 0:
            self.target_graph.append(None)
            return
        prefix_k = prompt_k.detach().requires_grad_()
        prefix_v = prompt_v.detach().requires_grad_()
        stream_in = self.stream.detach().requires_grad_(layer > 0)
        output = decoder_layer(
            stream_in, weights, geometry, lora, scale, self.stream_cos, self.stream_sin, prefix_k, prefix_v
        )
        self.target_graph.append((stream_in, output.out, prefix_k, prefix_v))
        self.stream = output.out

    # ---- 2. head -----------------------------------------------------------------------------

    def head(self) -> None:
        model, geometry = self.model, self.model.geometry
        last = self.activations.final_hidden() if self.replay else self.prompt_hidden[-1:]
        last_prompt = last.detach().requires_grad_()
        stream_final = self.stream.detach().requires_grad_()
        hidden = torch.cat([last_prompt, stream_final]) if self.stream_len > 0 else last_prompt
        logits = rms_norm(hidden, model.final_norm, geometry.rms_norm_eps) @ model.lm_head.t()
        loss = objective_loss(self.example.objective, logits, self.targets) * self.example.weight
        (loss * self.loss_scale).backward()
        self.result.loss = float(loss.detach())
        self.grad_stream = stream_final.grad if self.stream_len > 0 else None
        self.grad_prompt = torch.zeros(self.num_prompt, geometry.hidden_size, dtype=model.dtype, device=model.device)
        self.grad_prompt[-1:] = last_prompt.grad

    # ---- 3. backward -----------------------------------------------------------------------

    def backward_layer(self, layer: int) -> None:
        grad_k = grad_v = None
        entry = self.target_graph[layer]
        if entry is not None:
            stream_in, stream_out, prefix_k, prefix_v = entry
            backward_from([(stream_out, self.grad_stream)])
            self.grad_stream = stream_in.grad
            grad_k, grad_v = prefix_k.grad, prefix_v.grad
            self.target_graph[layer] = None  # free this layer's graph
        if self.replay:
            self.grad_prompt = _replay_prompt_layer(
                self.model, self.adapter, self.activations, layer, self.hedge, self.prompt_cos, self.prompt_sin,
                self.grad_prompt, grad_k, grad_v, self.result,
            )
        else:
            prompt_in, prompt_out, prompt_k, prompt_v = self.prompt_graph.pop()
            backward_from([(prompt_out, self.grad_prompt), (prompt_k, grad_k), (prompt_v, grad_v)])
            self.grad_prompt = prompt_in.grad


def _replay_prompt_layer(
    model, adapter, activations, layer, hedge, cos, sin, grad_prompt, grad_k, grad_v, result
):
    if layer > 0:
        activations.prefetch(layer - 1, BACKWARD_TENSORS)
    if not activations.on_device(layer) and hedge is not None and hedge.recompute_layer(activations, layer):
        x = activations.load(layer, ("x",))["x"]
        record = recompute_layer_record(
            x, model.layers[layer], model.geometry, adapter.layer(layer), adapter.spec.scale, cos, sin
        )
        result.layers_recomputed += 1
    else:
        if not activations.on_device(layer):
            result.layers_reloaded += 1
        record = LayerTensors.from_dict(activations.load(layer, BACKWARD_TENSORS))
    return replay_layer_backward(
        record, model.layers[layer], model.geometry, adapter.layer(layer), adapter.spec.scale,
        cos, sin, grad_prompt, grad_k, grad_v, need_input_grad=layer > 0,
    )


def run_to_completion(generator: Generator[SliceInfo, None, SampleResult]) -> SampleResult:
    """Drive a slice generator without pausing (tests, benchmarks, idle training)."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value
