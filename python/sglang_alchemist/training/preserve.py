"""Knowledge-preserving updates: what general text feeds each projection, and two ways to keep its outputs.

Two mechanisms share the statistics collected here (the inputs every projection receives while
the base model reads the guard bank's questions with their base answers):

- :class:`OutputAnchor` (the default, ``--alchemist-anchor-weight``): a soft penalty in every
  optimizer step on how much the adapter changes each projection's output over those inputs;
- :class:`PreservedSubspaces` (``--alchemist-preserve-energy``): a hard projection of LoRA ``A``
  off their top directions.

**The anchor.** For a projection ``W`` with input covariance ``C = E[k k^T]`` over general
text, the adapter's change ``dW = s B A`` moves the output by ``E||dW k||^2 = ||dW L||_F^2`` on
average, with ``L L^T = C`` (kept to the directions holding 99.9% of ``C``'s energy, at most
``ANCHOR_RANK``). Divided by ``E||W k||^2`` it is the *relative* mean-squared change of that
output, whatever the layer's scale; the penalty is its sum over adapted projections, times the
weight. This is the term MEMIT minimises in closed form to keep what a model knows while editing
one fact (Meng et al., 2023): the update is free along directions general text does not use
(what is particular to a new fact's subject) and expensive along the ones it does (the
relation's template, "Who wrote ...", which every control shares). Unlike rehearsal, which
constrains the few prompts it samples in a step, the penalty covers every position of the whole
bank in every step, at the cost of a few small matmuls.

Measured (docs/NOTES.md, "Learning from one correction"): rehearsal (cross-entropy or KL) did not
keep held-out controls; the hard projection kept them only by not learning the facts.

**The projection** (kept for comparison):

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

Both are computed once per model and guard bank (a forward over the bank) and cached in the
state directory beside the guard's answers.
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

ANCHOR_RANK = 256  # directions of each input's covariance the anchor keeps (at most)
ANCHOR_ENERGY = 0.999
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
        bases = yield from collect_inputs(model, sequences, lambda rows: _top_directions(rows, energy, max_rank))
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


def collect_inputs(model: FrozenModel, sequences: list[list[int]], reduce,
                   ) -> Generator[SliceInfo, None, list[dict[str, torch.Tensor]]]:
    """Run the base model over ``sequences``; ``reduce(rows)`` of every projection input kind, per layer."""
    device = model.device
    lengths = [len(s) for s in sequences]
    hidden = model.embed[torch.tensor([t for s in sequences for t in s], device=device)]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    reduced = []
    with torch.no_grad():
        for layer in range(model.geometry.num_layers):
            taps: dict[str, torch.Tensor] = {}
            caches = [(None, None) for _ in sequences]
            hidden = _layer_step(model, None, layer, hidden, positions, caches, lengths, taps)
            reduced.append({name: reduce(rows) for name, rows in taps.items()})
            yield SliceInfo(PRESERVE, layer, len(positions), max(lengths))
    return reduced


def _covariance_factor(rows: torch.Tensor) -> torch.Tensor:
    """``L`` ([width, k]) with ``L L^T`` the uncentred covariance of ``rows``, its top energy only."""
    rows = rows.float()
    values, vectors = torch.linalg.eigh(rows.t() @ rows / rows.shape[0])
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    share = torch.cumsum(values, 0) / values.sum().clamp_min(1e-12)
    keep = min(int((share < ANCHOR_ENERGY).sum().item()) + 1, ANCHOR_RANK, rows.shape[1])
    return (vectors[:, :keep] * values[:keep].sqrt()).contiguous()


def _weight_of(model: FrozenModel, layer: int, module: str) -> torch.Tensor:
    weights = model.layers[layer]
    return {"q_proj": weights.q, "k_proj": weights.k, "v_proj": weights.v, "o_proj": weights.o,
            "gate_proj": weights.gate, "up_proj": weights.up, "down_proj": weights.down}[module]


class OutputAnchor:
    """``penalty(adapter)``: weight x sum over adapted projections of their relative output change on general inputs."""

    def __init__(self, factors: list[dict[str, torch.Tensor]], model: FrozenModel, weight: float) -> None:
        self.factors = [{k: v.to(model.device, torch.float32) for k, v in layer.items()} for layer in factors]
        self.weight = weight
        self._base: dict[tuple[int, str], float] = {}  # E||W k||^2 of each projection
        self.model = model

    @classmethod
    def compute(cls, model: FrozenModel, sequences: list[list[int]], weight: float,
                ) -> Generator[SliceInfo, None, OutputAnchor]:
        factors = yield from collect_inputs(model, sequences, _covariance_factor)
        return cls(factors, model, weight)

    def _base_energy(self, layer: int, module: str) -> float:
        key = (layer, module)
        if key not in self._base:
            factor = self.factors[layer][INPUT_OF[module]]
            with torch.no_grad():
                self._base[key] = float(((_weight_of(self.model, layer, module).float() @ factor) ** 2).sum())
        return self._base[key]

    def penalty(self, adapter: LoraAdapter) -> torch.Tensor:
        """Differentiable in the adapter's parameters (call under ``torch.enable_grad``)."""
        total = torch.zeros((), device=self.model.device)
        scale = adapter.spec.scale
        for layer, modules in enumerate(adapter.params):
            for module, (a, b) in modules.items():
                # ||s B A L||_F^2 = s^2 <B^T B, (A L)(A L)^T>: two rank x rank Gram matrices, never
                # the [out, k] product (a few times cheaper on the wide MLP projections).
                reduced = a @ self.factors[layer][INPUT_OF[module]]
                moved = (b.t() @ b * (reduced @ reduced.t())).sum() * scale * scale
                total = total + moved / self._base_energy(layer, module)
        return self.weight * total

    def rank(self) -> dict[str, float]:
        """Mean covariance directions kept per input kind (status)."""
        kinds = self.factors[0].keys() if self.factors else ()
        return {kind: sum(f[kind].shape[1] for f in self.factors) / len(self.factors) for kind in kinds}

    def save(self, path: Path) -> None:
        import io

        from sglang_alchemist.training.durable import write_atomically

        buffer = io.BytesIO()
        torch.save([{k: v.cpu() for k, v in layer.items()} for layer in self.factors], buffer)
        write_atomically(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path, model: FrozenModel, weight: float) -> OutputAnchor | None:
        try:
            return cls(torch.load(path, map_location="cpu"), model, weight)
        except (OSError, RuntimeError, EOFError, ValueError) as error:
            if path.exists():
                logger.warning("sglang_alchemist: ignoring an unreadable anchor cache %s (%s)", path, error)
            return None
