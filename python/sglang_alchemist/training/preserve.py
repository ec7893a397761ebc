"""Knowledge-preserving updates: LoRA changes nothing along the directions general text uses most.

A LoRA projection changes its layer's output by ``B A k`` for an input ``k``. What the model
knows about the world is read out by the same projections from the inputs ordinary questions
produce; the knowledge-editing literature (ROME, MEMIT, AlphaEdit) keeps it by constraining an
edit to leave those inputs' outputs alone. Here the constraint is kept exactly and cheaply:

1. The base model reads the guard bank's questions with their base answers
   (``training/guard.py``), layer by layer, and the inputs of every projection are collected
   (the input norm's output for q/k/v, the attention output for o, the post-attention norm's
   output for gate/up, SiLU(gate)*up for down). Their uncentred covariance's top eigenvectors
   ``U`` (the smallest set holding ``energy`` of it, at most ``max_rank`` per input) span what
   general questions feed each projection.
2. After every optimizer step each LoRA ``A`` is projected: ``A <- A - (A U) U^T``. Then
   ``A k = 0`` for every ``k`` in that span, so the adapter leaves those inputs' outputs as they
   were, while the directions a new fact's subject adds (outside the span) are free to learn.

The subspaces are computed once per model and guard bank (a forward over the bank) and cached
in the state directory beside the guard's answers.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from pathlib import Path

import torch

from sglang_alchemist.training.generate import _layer_step
from sglang_alchemist.training.lora import LoraAdapter
from sglang_alchemist.training.model_spec import FrozenModel
from sglang_alchemist.training.step import SliceInfo

logger = logging.getLogger(__name__)

INPUT_OF = {"q_proj": "attention_input", "k_proj": "attention_input", "v_proj": "attention_input",
            "o_proj": "o_input", "gate_proj": "mlp_input", "up_proj": "mlp_input", "down_proj": "down_input"}
PRESERVE = "preserve"


class PreservedSubspaces:
    """``bases[layer][input] = U`` ([width, k], orthonormal columns) and the projection of an adapter."""

    def __init__(self, bases: list[dict[str, torch.Tensor]]) -> None:
        self.bases = bases

    @classmethod
    def compute(cls, model: FrozenModel, sequences: list[list[int]], energy: float, max_rank: int,
                ) -> Generator[SliceInfo, None, PreservedSubspaces]:
        """Run the base model over ``sequences`` (prompt + base answer each); one slice per layer."""
        device = model.device
        lengths = [len(s) for s in sequences]
        hidden = model.embed[torch.tensor([t for s in sequences for t in s], device=device)]
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        bases = []
        with torch.no_grad():
            for layer in range(model.geometry.num_layers):
                taps: dict[str, torch.Tensor] = {}
                caches = [(None, None) for _ in sequences]
                hidden = _layer_step(model, None, layer, hidden, positions, caches, lengths, taps)
                bases.append({name: _top_directions(rows, energy, max_rank) for name, rows in taps.items()})
                yield SliceInfo(PRESERVE, layer, len(positions), max(lengths))
        return cls(bases)

    def project(self, adapter: LoraAdapter) -> None:
        with torch.no_grad():
            for layer, modules in enumerate(adapter.params):
                for module, (a, _) in modules.items():
                    basis = self.bases[layer][INPUT_OF[module]].to(a.device, a.dtype)
                    a.sub_((a @ basis) @ basis.t())

    def rank(self) -> dict[str, float]:
        """Mean preserved dimensions per input kind (status)."""
        kinds = self.bases[0].keys() if self.bases else ()
        return {kind: sum(b[kind].shape[1] for b in self.bases) / len(self.bases) for kind in kinds}

    def save(self, path: Path) -> None:
        import io

        from sglang_alchemist.training.durable import write_atomically

        buffer = io.BytesIO()
        torch.save([{k: v.cpu() for k, v in layer.items()} for layer in self.bases], buffer)
        write_atomically(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> PreservedSubspaces | None:
        try:
            return cls(torch.load(path, map_location="cpu"))
        except (OSError, RuntimeError, EOFError, ValueError) as error:
            if path.exists():
                logger.warning("sglang_alchemist: ignoring an unreadable subspace cache %s (%s)", path, error)
            return None


def _top_directions(rows: torch.Tensor, energy: float, max_rank: int) -> torch.Tensor:
    rows = rows.float()
    covariance = rows.t() @ rows
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    share = torch.cumsum(values, 0) / values.sum().clamp_min(1e-12)
    keep = min(int((share < energy).sum().item()) + 1, max_rank, rows.shape[1])
    return vectors[:, :keep].contiguous()
