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
graph lives in the generator's frame). LoRA gradients accumulate in the adapter's ``.grad``.
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
    geometry = model.geometry
    device = model.device
    scale = adapter.spec.scale
    prompt = torch.tensor(example.prompt_ids, device=device)
    targets = torch.tensor(example.target_ids, device=device)
    num_prompt, num_target = len(example.prompt_ids), len(example.target_ids)
    stream_len = num_target - 1  # the last target token is only a label
    cos, sin = model.rotary_cos_sin(torch.arange(num_prompt + stream_len))
    prompt_cos, prompt_sin = cos[:num_prompt], sin[:num_prompt]
    stream_cos, stream_sin = cos[num_prompt:], sin[num_prompt:]
    activations = example.activations
    replay = activations is not None
    result = SampleResult(loss=0.0, target_tokens=num_target, path="replay" if replay else "recompute")

    # ---- 1. forward ------------------------------------------------------------------------
    stream = model.embed[targets[:stream_len]]
    prompt_hidden = None if replay else model.embed[prompt]
    target_graph: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
    prompt_graph: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    with torch.enable_grad():
        for layer, weights in enumerate(model.layers):
            lora = adapter.layer(layer)
            if replay:
                recorded = activations.load(layer, ("k", "v"))
                prompt_k, prompt_v = prompt_keys_values(
                    recorded["k"], recorded["v"], weights, geometry, prompt_cos, prompt_sin
                )
            else:
                prompt_in = prompt_hidden.detach().requires_grad_(layer > 0)
                output = decoder_layer(prompt_in, weights, geometry, lora, scale, prompt_cos, prompt_sin)
                prompt_graph.append((prompt_in, output.out, output.k_rot, output.v))
                prompt_k, prompt_v, prompt_hidden = output.k_rot, output.v, output.out
            if stream_len > 0:
                prefix_k = prompt_k.detach().requires_grad_()
                prefix_v = prompt_v.detach().requires_grad_()
                stream_in = stream.detach().requires_grad_(layer > 0)
                output = decoder_layer(
                    stream_in, weights, geometry, lora, scale, stream_cos, stream_sin, prefix_k, prefix_v
                )
                target_graph.append((stream_in, output.out, prefix_k, prefix_v))
                stream = output.out
            else:
                target_graph.append(None)
            info = SliceInfo("forward", layer, stream_len + (0 if replay else num_prompt))
            result.slices.append(info)
            yield info

        # ---- 2. head -----------------------------------------------------------------------
        last_prompt = (activations.final_hidden() if replay else prompt_hidden[-1:]).detach().requires_grad_()
        stream_final = stream.detach().requires_grad_()
        hidden = torch.cat([last_prompt, stream_final]) if stream_len > 0 else last_prompt
        logits = rms_norm(hidden, model.final_norm, geometry.rms_norm_eps) @ model.lm_head.t()
        loss = objective_loss(example.objective, logits, targets) * example.weight
        (loss * loss_scale).backward()
        result.loss = float(loss.detach())
        grad_stream = stream_final.grad if stream_len > 0 else None
        grad_prompt = torch.zeros(num_prompt, geometry.hidden_size, dtype=model.dtype, device=device)
        grad_prompt[-1:] = last_prompt.grad
        del logits, hidden, loss
        info = SliceInfo("head", geometry.num_layers, num_target)
        result.slices.append(info)
        yield info

        # ---- 3. backward -------------------------------------------------------------------
        for layer in reversed(range(geometry.num_layers)):
            grad_k = grad_v = None
            entry = target_graph[layer]
            if entry is not None:
                stream_in, stream_out, prefix_k, prefix_v = entry
                backward_from([(stream_out, grad_stream)])
                grad_stream = stream_in.grad
                grad_k, grad_v = prefix_k.grad, prefix_v.grad
                target_graph[layer] = None  # free this layer's graph
            if replay:
                grad_prompt = _replay_prompt_layer(
                    model, adapter, activations, layer, hedge, prompt_cos, prompt_sin,
                    grad_prompt, grad_k, grad_v, result,
                )
            else:
                prompt_in, prompt_out, prompt_k, prompt_v = prompt_graph.pop()
                backward_from([(prompt_out, grad_prompt), (prompt_k, grad_k), (prompt_v, grad_v)])
                grad_prompt = prompt_in.grad
            info = SliceInfo("backward", layer, stream_len + num_prompt)
            result.slices.append(info)
            yield info
    return result


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
