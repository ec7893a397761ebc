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
- ``distill`` (the forgetting guard's rehearsal): KL(base || adapted) of the next-token
  distribution at every target position, the base model's distribution given by its ``top_k``
  most likely tokens plus one bucket for the rest (:class:`Teacher`). Cross-entropy on the base
  model's greedy answer would also *sharpen* the model on it (its gradient is never zero);
  the KL is zero, with zero gradient, until the adapter moves that distribution, and then pulls
  back the whole distribution, not one token of it.

All return a *sum* over tokens; the trainer divides by the number of target tokens in the
optimizer step, so long and short samples weigh per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("sft", "unlikelihood", "distill")


@dataclass(frozen=True)
class Teacher:
    """The base model's next-token distribution at each target position: its top-k, the rest as one bucket."""

    ids: torch.Tensor  # [targets, k] token ids
    log_probs: torch.Tensor  # [targets, k] their log-probabilities

    def rows(self, start: int, end: int) -> Teacher:
        return Teacher(self.ids[start:end], self.log_probs[start:end])

    def to(self, device) -> Teacher:
        return Teacher(self.ids.to(device), self.log_probs.to(device))


def top_k_teacher(logits: torch.Tensor, k: int) -> Teacher:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
    return Teacher(ids.cpu(), values.cpu())


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def unlikelihood_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    token_log_prob = log_probs.gather(-1, targets[:, None])[:, 0]
    # log(1 - p) computed stably from log p; clamp keeps it finite when p -> 1.
    return -torch.log1p(-token_log_prob.exp().clamp(max=1.0 - 1e-6)).sum()


def distill_loss(logits: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    log_q = torch.log_softmax(logits.float(), dim=-1)
    log_q_top = log_q.gather(-1, teacher.ids)
    log_p_top = teacher.log_probs.float()
    p_top = log_p_top.exp()
    p_rest = (1.0 - p_top.sum(-1)).clamp(min=0.0)
    log_q_rest = torch.log1p(-log_q_top.exp().sum(-1).clamp(max=1.0 - 1e-6))
    kl = (p_top * (log_p_top - log_q_top)).sum(-1) + p_rest * (torch.log(p_rest.clamp(min=1e-12)) - log_q_rest)
    return kl.sum()


def objective_loss(name: str, logits: torch.Tensor, targets: torch.Tensor,
                   teacher: Teacher | None = None) -> torch.Tensor:
    if name == "sft":
        return sft_loss(logits, targets)
    if name == "unlikelihood":
        return unlikelihood_loss(logits, targets)
    if name == "distill":
        if teacher is None:
            raise ValueError("the distill objective needs the base model's distribution (a Teacher)")
        return distill_loss(logits, teacher)
    raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")
