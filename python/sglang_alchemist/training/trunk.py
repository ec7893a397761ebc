"""The frozen trunk's records: the residual entering the first adapted layer, kept for good.

With the LoRA adapter on the top layers only (``--alchemist-lora-layers``; ``LoraSpec.first_layer``
``k``), layers ``0..k-1`` compute the same values under every adapter version: the base model's.
So the residual stream entering layer ``k`` - one hidden-size row per token, 2.3 KB per token on
SmolLM2 in fp32 against 675 KB for every layer's record - is an *exact* record of the bottom ``k``
layers for any token sequence, whatever the version, the optimizer step or the item: it never goes
stale. Every later use of a sequence (the later steps of an update, the convergence checks,
experience replay of earlier feedback, rehearsal of the guard's prompts) starts at layer ``k``
from it and never runs the trunk again.

A record is keyed by the token ids of its rows: the prompt followed by the target tokens but the
last (the rows a training step runs; ``step.Example``). It is made the first time a sequence is
trained or checked (``SampleResult.trunk``), from serving's recorded prompt rows where they exist
(``step.enter_adapted_layers``), and for the guard bank's rehearsal prompts once per model, ahead of
time (``LearningCore.prepare``, cached with the guard's answers). ``TrunkRecords`` holds them in host
memory under a byte budget (``--alchemist-trunk-host-mb``), least recently used out first; a
``pinned`` record (the bank's, which every update draws on) is never dropped. A dropped record
costs one more forward of the trunk the next time its sequence is trained, nothing else.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TRUNK = "trunk"  # slice kind: the trunk's forward over sequences that have no record yet


def trunk_key(prompt_ids: Sequence[int], target_ids: Sequence[int]) -> tuple[int, ...]:
    """The rows a step runs for ``prompt + target``: every target token but the last is an input."""
    return (*prompt_ids, *target_ids[:-1])


@dataclass
class TrunkCounters:
    hits: int = 0
    misses: int = 0
    stored: int = 0
    dropped: int = 0


class TrunkRecords:
    """``key -> [rows, hidden]`` residuals entering the first adapted layer (host memory, LRU)."""

    def __init__(self, budget_bytes: int, first_layer: int) -> None:
        self.budget_bytes = budget_bytes
        self.first_layer = first_layer
        self.counters = TrunkCounters()
        self._records: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._pinned: set[tuple[int, ...]] = set()
        self._bytes = 0
        self._lock = threading.Lock()  # the training thread writes; status is read from the scheduler thread

    @property
    def enabled(self) -> bool:
        """No trunk when every layer is adapted (the embedding lookup is all there is below layer 0)."""
        return self.first_layer > 0

    def get(self, key: tuple[int, ...]) -> torch.Tensor | None:
        if not self.enabled:
            return None
        with self._lock:
            record = self._records.get(key)
            if record is None:
                self.counters.misses += 1
                return None
            self._records.move_to_end(key)
            self.counters.hits += 1
            return record

    def __contains__(self, key: tuple[int, ...]) -> bool:
        return key in self._records

    def put(self, key: tuple[int, ...], rows: torch.Tensor, pinned: bool = False) -> None:
        """Keep ``rows`` (copied to host memory) for ``key``; the oldest unpinned records make room."""
        if not self.enabled or rows.shape[0] != len(key):
            return
        size = rows.numel() * rows.element_size()
        if size > self.budget_bytes and not pinned:
            return
        rows = rows.detach().to("cpu", copy=True)
        with self._lock:
            old = self._records.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            while self._bytes + size > self.budget_bytes and not pinned:
                victim = next((k for k in self._records if k not in self._pinned), None)
                if victim is None:
                    return
                dropped = self._records.pop(victim)
                self._bytes -= dropped.numel() * dropped.element_size()
                self.counters.dropped += 1
            self._records[key] = rows
            self._bytes += size
            if pinned:
                self._pinned.add(key)
            self.counters.stored += 1

    @staticmethod
    def save_file(path: Path, records: dict[tuple[int, ...], torch.Tensor]) -> None:
        from sglang_alchemist.training.durable import write_atomically

        buffer = io.BytesIO()
        torch.save([(torch.tensor(key, dtype=torch.int32), rows) for key, rows in records.items()], buffer)
        write_atomically(path, buffer.getvalue())

    @staticmethod
    def load_file(path: Path) -> dict[tuple[int, ...], torch.Tensor]:
        """Records saved by ``save_file``; empty when the file is missing or unreadable (then recomputed)."""
        if not path.exists():
            return {}
        try:
            return {tuple(key.tolist()): rows for key, rows in torch.load(path, map_location="cpu")}
        except (OSError, RuntimeError, EOFError, ValueError, TypeError) as error:
            logger.warning("sglang_alchemist: ignoring an unreadable trunk cache %s (%s)", path, error)
            return {}

    def pinned_items(self) -> dict[tuple[int, ...], torch.Tensor]:
        with self._lock:
            return {key: self._records[key] for key in self._pinned if key in self._records}

    def status(self) -> dict:
        with self._lock:
            c = self.counters
            return {"first_adapted_layer": self.first_layer, "records": len(self._records),
                    "pinned": len(self._pinned), "bytes": self._bytes, "budget_bytes": self.budget_bytes,
                    "hits": c.hits, "misses": c.misses, "stored": c.stored, "dropped": c.dropped}


@torch.no_grad()
def trunk_residuals(model, sequences: list[list[int]], first_layer: int,
                    ) -> Generator[object, None, list[torch.Tensor]]:
    """The residual entering ``first_layer`` for every row of each sequence (the base model's trunk).

    One forward of the sequences together through layers ``0..first_layer-1`` (no adapter: none
    exists there), yielding after each layer like a training step.
    """
    from sglang_alchemist.training.generate import _layer_step
    from sglang_alchemist.training.step import SliceInfo

    device = model.device
    lengths = [len(s) for s in sequences]
    hidden = model.embed[torch.tensor([t for s in sequences for t in s], device=device)]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    for layer in range(first_layer):
        hidden = _layer_step(model, None, layer, hidden, positions, [(None, None) for _ in sequences], lengths)
        yield SliceInfo(TRUNK, layer, len(positions), max(lengths))
    return [rows.clone() for rows in torch.split(hidden, lengths)]
