"""Training objectives on the target tokens of one sample.

- ``sft`` (accept and correction feedback): cross-entropy of the target tokens given the
  prompt - the accepted response, or the user's correction, in the model's chat template.
- ``unlikelihood`` (reject feedback): ``-log(1 - p(token))`` summed over the rejected
  response's tokens (Welleck et al., 2019). A reject says what *not* to say but not what to
  say instead; cross-entropy has no target to use, and gradient *ascent* on the rejected
  tokens' log-likelihood is unbounded (it keeps pushing long after the token is unlikely, and
  wrecks the model). Unlikelihood is bounded: its gradient vanishes as ``p(token) -> 0``, so it
  removes the rejected continuation and then stops. ``--alchemist-reject-objective skip``
  journals rejects without training on them.

Both return a *sum* over tokens; the trainer divides by the number of target tokens in the
optimizer step, so long and short samples weigh per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OBJECTIVES = ("sft", "unlikelihood")


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def unlikelihood_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    token_log_prob = log_probs.gather(-1, targets[:, None])[:, 0]
    # log(1 - p) computed stably from log p; clamp keeps it finite when p -> 1.
    return -torch.log1p(-token_log_prob.exp().clamp(max=1.0 - 1e-6)).sum()


def objective_loss(name: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if name == "sft":
        return sft_loss(logits, targets)
    if name == "unlikelihood":
        return unlikelihood_loss(logits, targets)
    raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")
