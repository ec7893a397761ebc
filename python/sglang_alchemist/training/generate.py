"""Greedy decoding and teacher-forced scoring with the trainer's own forward (plain PyTorch).

The forgetting guard needs to know what the *base* model answers to its prompts, and the
publish gate needs to know whether a candidate adapter still gives those answers. Both are
computed here, with exactly the numerics the trainer uses (``training/layers.py``), so at the
base version a teacher-forced check of the base's own greedy answer agrees with it by
construction and any disagreement later is the adapter's doing:

- :func:`greedy_generate` decodes a batch of prompts: each prompt is prefilled alone, then
  every decode step runs the new tokens of all unfinished sequences through the projections
  as one batch (the heavy part), with attention per sequence over its own cached keys/values.
- :func:`teacher_forced` runs ``prompt + answer`` forward and reports, per answer token,
  whether the argmax of the previous position predicts it, plus the answer's mean NLL.

Both are generators that yield after each layer of work, like a training step, so the
training thread can interleave them with serving; ``run_to_completion`` drives them at once.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_alchemist.training.layers import (
    attention,
    linear,
    project_gate_up,
    project_qkv,
    rms_norm,
    rotate_qk,
)
from sglang_alchemist.training.lora import LoraAdapter
from sglang_alchemist.training.model_spec import FrozenModel
from sglang_alchemist.training.objectives import Teacher, top_k_teacher
from sglang_alchemist.training.step import SliceInfo

GENERATE = "generate"
SCORE = "score"


@dataclass
class Score:
    agree: list[bool]  # per answer token: the greedy prediction equals it
    nll: float  # mean negative log-likelihood per answer token
    teacher: Teacher | None = None  # top-k next-token distribution at each answer position (``top_k``)

    @property
    def first_disagreement(self) -> int | None:
        return next((i for i, ok in enumerate(self.agree) if not ok), None)


def _lora(adapter: LoraAdapter | None, layer: int):
    if adapter is None:
        return {}, 0.0
    return adapter.layer(layer), adapter.spec.scale


def _layer_step(model: FrozenModel, adapter, layer: int, hidden: torch.Tensor, positions: torch.Tensor,
                caches: list[tuple[torch.Tensor | None, torch.Tensor | None]], lengths: list[int],
                taps: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One layer over a batch of new tokens from several sequences (``lengths`` rows each).

    ``caches[i]`` holds sequence i's rotated keys/values of this layer so far; they are extended.
    ``taps``, when given, receives the inputs of the layer's projections (``training/preserve.py``).
    """
    geometry, weights = model.geometry, model.layers[layer]
    lora, scale = _lora(adapter, layer)
    eps = geometry.rms_norm_eps
    cos, sin = model.rotary_cos_sin(positions)
    xn = rms_norm(hidden, weights.input_norm, eps)
    q, k, v = project_qkv(xn, weights, lora, scale)
    q_rot, k_rot = rotate_qk(q, k, weights, geometry, cos, sin)
    v = v.view(-1, geometry.num_kv_heads, geometry.head_dim)
    outputs, offset = [], 0
    for index, rows in enumerate(lengths):
        span = slice(offset, offset + rows)
        cached_k, cached_v = caches[index]
        keys = k_rot[span] if cached_k is None else torch.cat([cached_k, k_rot[span]])
        values = v[span] if cached_v is None else torch.cat([cached_v, v[span]])
        caches[index] = (keys, values)
        outputs.append(attention(q_rot[span], keys, values, keys.shape[0] - rows))
        offset += rows
    attn_out = torch.cat(outputs)
    h = hidden + linear(attn_out, weights.o, None, lora.get("o_proj"), scale)
    hn = rms_norm(h, weights.post_norm, eps)
    gate, up = torch.split(project_gate_up(hn, weights, lora, scale), weights.gate.shape[0], dim=-1)
    gated = F.silu(gate) * up
    if taps is not None:
        taps.update(attention_input=xn, o_input=attn_out, mlp_input=hn, down_input=gated)
    return h + linear(gated, weights.down, None, lora.get("down_proj"), scale)


def _logits(model: FrozenModel, hidden: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden, model.final_norm, model.geometry.rms_norm_eps) @ model.lm_head.t()


@torch.no_grad()
def greedy_generate(model: FrozenModel, adapter: LoraAdapter | None, prompts: list[list[int]], max_new_tokens: int,
                    stop_ids: set[int]) -> Generator[SliceInfo, None, list[list[int]]]:
    """Greedy continuations (without the prompt; a stop token is included when reached)."""
    layers = model.geometry.num_layers
    device = model.device
    caches = [[(None, None) for _ in prompts] for _ in range(layers)]
    outputs: list[list[int]] = [[] for _ in prompts]
    # prefill, one prompt at a time (different lengths), all layers
    last_hidden = []
    for index, prompt in enumerate(prompts):
        hidden = model.embed[torch.tensor(prompt, device=device)]
        positions = torch.arange(len(prompt), device=device)
        for layer in range(layers):
            per_layer = [caches[layer][index]]
            hidden = _layer_step(model, adapter, layer, hidden, positions, per_layer, [len(prompt)])
            caches[layer][index] = per_layer[0]
        last_hidden.append(hidden[-1:])
        yield SliceInfo(GENERATE, layers, len(prompt), len(prompt))
    live = list(range(len(prompts)))
    next_tokens = {i: int(_logits(model, last_hidden[i]).argmax(-1)) for i in live}
    for step in range(max_new_tokens):
        for i in live:
            outputs[i].append(next_tokens[i])
        live = [i for i in live if next_tokens[i] not in stop_ids]
        if not live or step == max_new_tokens - 1:
            break
        hidden = model.embed[torch.tensor([next_tokens[i] for i in live], device=device)]
        positions = torch.tensor([len(prompts[i]) + len(outputs[i]) - 1 for i in live], device=device)
        for layer in range(layers):
            per_layer = [caches[layer][i] for i in live]
            hidden = _layer_step(model, adapter, layer, hidden, positions, per_layer, [1] * len(live))
            for slot, i in enumerate(live):
                caches[layer][i] = per_layer[slot]
        tokens = _logits(model, hidden).argmax(-1).tolist()
        next_tokens = dict(zip(live, tokens, strict=True))
        yield SliceInfo(GENERATE, layers, len(live), max(len(prompts[i]) for i in live))
    return outputs


@torch.no_grad()
def teacher_forced(model: FrozenModel, adapter: LoraAdapter | None,
                   pairs: list[tuple[list[int], list[int]]], top_k: int = 0) -> Generator[SliceInfo, None, list[Score]]:
    """Per (prompt, answer): does greedy decoding reproduce each answer token, and the answer's NLL.

    ``top_k > 0`` also keeps the ``top_k`` most likely next tokens at each answer position (the
    ``distill`` objective's teacher).
    """
    device = model.device
    scores: list[Score] = []
    for prompt, answer in pairs:
        sequence = torch.tensor(prompt + answer, device=device)
        hidden = model.embed[sequence]
        positions = torch.arange(len(sequence), device=device)
        for layer in range(model.geometry.num_layers):
            hidden = _layer_step(model, adapter, layer, hidden, positions, [(None, None)], [len(sequence)])
        logits = _logits(model, hidden[len(prompt) - 1 : len(sequence) - 1]).float()
        targets = sequence[len(prompt) :]
        agree = (logits.argmax(-1) == targets).tolist()
        nll = float(F.cross_entropy(logits, targets)) if len(answer) else 0.0
        scores.append(Score(agree, nll, top_k_teacher(logits, top_k) if top_k > 0 else None))
        yield SliceInfo(SCORE, model.geometry.num_layers, len(sequence), len(sequence))
    return scores
