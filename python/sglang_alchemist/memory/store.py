"""The activation store: recorded prefill chunks in a device tier and a host tier, under byte budgets.

Unit of storage: a :class:`RecordedChunk` - the recorded rows of one request's prefill forward
(a whole prompt, or one piece of a chunked prefill), all layers, plus the KV slot index of each
row. Samples (``SampleActivations``) reference rows of one or more chunks; chunks are
reference-counted and freed when no sample needs them.

Keys and ownership. Each row is indexed by its KV slot (the radix cache's index space: a
prefix-cache hit hands a new request the slots of its cached prefix, and the store finds the
rows recorded for them). A slot can be freed by SGLang and reused for another request's
tokens, so a hit is trusted only if the chunk that recorded the slot was made (a) for the same
token ids at every position up to and including that row and (b) with the same adapter
version: values of a causal model at position i depend on exactly those. Otherwise the lookup
reports ``slot_reused`` and the rows count as missing (the trainer recomputes).

Tiers and budgets (``--alchemist-activation-device-mb``, ``--alchemist-activation-host-mb``):
- New chunks go to the device tier. When it is full, the least recently used chunk moves to
  the host tier one layer at a time, **first layers first** (the backward reads them last,
  so they have the longest time to come back).
- When the host tier is full, the chunk used longest ago is dropped entirely - the oldest
  sample's, unless a newer request reused its rows (a shared system prompt is reused by
  every request, so it stays); samples that used it train by recomputation.
- Byte counts never exceed the budgets: room is made *before* bytes are admitted, and a chunk
  that cannot fit anywhere is not stored.
On CUDA the host tier is pinned memory and copies run on a side stream ordered by events, so
the serving stream never waits for them; on CPU the tiers are the same RAM and a move only
changes which budget the bytes count against.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from enum import StrEnum

import torch

logger = logging.getLogger(__name__)


class Tier(StrEnum):
    DEVICE = "device"
    HOST = "host"


@dataclass
class ChunkLayer:
    tensors: dict[str, torch.Tensor]
    tier: Tier
    nbytes: int
    # CUDA only: the device-to-host copy that filled ``tensors`` (host tier), and a
    # host-to-device prefetch in flight on the copy stream.
    copy_done: torch.cuda.Event | None = None
    prefetched: dict[str, torch.Tensor] | None = None
    prefetch_done: torch.cuda.Event | None = None


@dataclass
class RecordedChunk:
    chunk_id: int
    owner: str  # request id that recorded it
    start: int  # prompt position of row 0
    num_tokens: int
    prompt_ids: torch.Tensor  # int64 CPU; the owner's prompt, at least up to start + num_tokens
    slots: torch.Tensor  # int64 CPU, KV slot of each row
    adapter_version: int
    layers: list[ChunkLayer]
    final_hidden: torch.Tensor | None  # [1, hidden]: final residual of the last row
    created: int
    last_used: int
    refcount: int = 0
    dropped: bool = False

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def tier_bytes(self, tier: Tier) -> int:
        return sum(layer.nbytes for layer in self.layers if layer.tier is tier)


@dataclass
class ChunkView:
    """Rows [row_start, row_end) of a chunk, i.e. prompt positions chunk.start + row_*."""

    chunk: RecordedChunk
    row_start: int
    row_end: int

    @property
    def position_start(self) -> int:
        return self.chunk.start + self.row_start

    @property
    def position_end(self) -> int:
        return self.chunk.start + self.row_end


@dataclass
class StoreCounters:
    chunks_stored: int = 0
    chunks_not_stored: int = 0  # did not fit in device + host budgets
    layers_moved_to_host: int = 0
    chunks_dropped: int = 0  # host tier full: dropped (samples will recompute)
    chunks_released: int = 0  # no sample needs them any more
    prefix_lookups: int = 0
    prefix_hits: int = 0  # every cached prefix row found and valid
    prefix_missing: int = 0  # some cached prefix row was never recorded (or was dropped)
    prefix_slot_reused: int = 0  # a slot's record belonged to other tokens or another version
    layers_loaded_from_host: int = 0
    peak_device_bytes: int = 0
    peak_host_bytes: int = 0


@dataclass
class ActivationStore:
    device: torch.device
    device_budget_bytes: int
    host_budget_bytes: int
    kv_slots: int  # size of SGLang's KV slot index space
    chunks: dict[int, RecordedChunk] = field(default_factory=dict)
    device_bytes: int = 0
    host_bytes: int = 0
    counters: StoreCounters = field(default_factory=StoreCounters)

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)
        self._slot_owner = torch.full((self.kv_slots,), -1, dtype=torch.int64)
        self._slot_row = torch.zeros(self.kv_slots, dtype=torch.int64)
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None

    # --- admission ------------------------------------------------------------------------

    def reserve(self, nbytes: int) -> None:
        """Make room on the device tier before a forward records ``nbytes`` (best effort)."""
        self._make_device_room(min(nbytes, self.device_budget_bytes), protect=None)

    def add_chunk(
        self,
        owner: str,
        start: int,
        prompt_ids: torch.Tensor,
        slots: torch.Tensor,
        adapter_version: int,
        layer_tensors: list[dict[str, torch.Tensor]],
        final_hidden: torch.Tensor | None,
    ) -> RecordedChunk | None:
        """Admit a recorded chunk; the last layers take the device tier first. None: no room."""
        sizes = [sum(t.numel() * t.element_size() for t in tensors.values()) for tensors in layer_tensors]
        if sum(sizes) > self.device_budget_bytes + self.host_budget_bytes:
            self.counters.chunks_not_stored += 1
            return None
        now = next(self._clock)
        chunk = RecordedChunk(
            chunk_id=next(self._ids), owner=owner, start=start, num_tokens=int(slots.numel()),
            prompt_ids=prompt_ids, slots=slots.to("cpu", torch.int64), adapter_version=adapter_version,
            layers=[], final_hidden=final_hidden, created=now, last_used=now,
        )
        placed: list[ChunkLayer | None] = [None] * len(layer_tensors)
        for index in reversed(range(len(layer_tensors))):
            tensors, nbytes = layer_tensors[index], sizes[index]
            if self._make_device_room(nbytes, protect=chunk):
                placed[index] = ChunkLayer(tensors, Tier.DEVICE, nbytes)
                self.device_bytes += nbytes
            elif self._make_host_room(nbytes, protect=chunk):
                placed[index] = self._to_host(ChunkLayer(tensors, Tier.DEVICE, nbytes))
                self.host_bytes += nbytes
            else:  # cannot fit: undo what was placed
                for layer in placed:
                    if layer is not None:
                        self._uncount(layer)
                self.counters.chunks_not_stored += 1
                return None
        chunk.layers = list(placed)  # type: ignore[arg-type]
        self.chunks[chunk.chunk_id] = chunk
        self._slot_owner[chunk.slots] = chunk.chunk_id
        self._slot_row[chunk.slots] = torch.arange(chunk.num_tokens)
        self.counters.chunks_stored += 1
        self._note_peaks()
        return chunk

    # --- references -----------------------------------------------------------------------

    def acquire(self, views: list[ChunkView]) -> None:
        for view in views:
            view.chunk.refcount += 1

    def release(self, views: list[ChunkView]) -> None:
        for view in views:
            chunk = view.chunk
            chunk.refcount -= 1
            if chunk.refcount <= 0 and not chunk.dropped:
                self._remove(chunk)
                self.counters.chunks_released += 1

    def touch(self, chunk: RecordedChunk) -> None:
        chunk.last_used = next(self._clock)

    # --- prefix lookup --------------------------------------------------------------------

    def lookup_prefix(
        self, prompt_ids: torch.Tensor, prefix_slots: torch.Tensor, adapter_version: int
    ) -> tuple[list[ChunkView] | None, str | None]:
        """Views covering positions [0, len(prefix_slots)), or (None, reason) when not usable."""
        self.counters.prefix_lookups += 1
        if prefix_slots.numel() == 0:
            return [], None
        slots = prefix_slots.to("cpu", torch.int64)
        owners = self._slot_owner[slots]
        if bool((owners < 0).any()):
            self.counters.prefix_missing += 1
            return None, "prefix_not_recorded"
        rows = self._slot_row[slots]
        # Split into runs of one chunk with consecutive rows.
        breaks = torch.nonzero((owners[1:] != owners[:-1]) | (rows[1:] != rows[:-1] + 1)).flatten() + 1
        bounds = [0, *breaks.tolist(), int(slots.numel())]
        views: list[ChunkView] = []
        for run_start, run_end in itertools.pairwise(bounds):
            chunk = self.chunks.get(int(owners[run_start]))
            row_start = int(rows[run_start])
            view = None if chunk is None else ChunkView(chunk, row_start, row_start + run_end - run_start)
            if view is None or chunk.dropped:
                self.counters.prefix_missing += 1
                return None, "prefix_not_recorded"
            valid = (
                view.position_start == run_start
                and chunk.adapter_version == adapter_version
                and chunk.prompt_ids.numel() >= view.position_end
                and torch.equal(chunk.prompt_ids[: view.position_end], prompt_ids[: view.position_end])
            )
            if not valid:
                self.counters.prefix_slot_reused += 1
                return None, "slot_reused"
            views.append(view)
        for view in views:
            self.touch(view.chunk)  # rows shared by a new request are as recent as it is
        self.counters.prefix_hits += 1
        return views, None

    # --- loading for the trainer ----------------------------------------------------------

    def load_layer(self, views: list[ChunkView], layer: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """One layer's tensors for the positions covered by ``views``, on the device."""
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for view in views:
            chunk_layer = view.chunk.layers[layer]
            self.touch(view.chunk)
            if chunk_layer.tier is Tier.HOST:
                self.counters.layers_loaded_from_host += 1
            for name in names:
                parts[name].append(self._on_device(chunk_layer, name)[view.row_start : view.row_end])
        return {name: tensors[0] if len(tensors) == 1 else torch.cat(tensors) for name, tensors in parts.items()}

    def prefetch_layer(self, views: list[ChunkView], layer: int, names: tuple[str, ...]) -> None:
        """Start the host-to-device copies of one layer on the copy stream (CUDA only)."""
        if not self._cuda:
            return
        for view in views:
            chunk_layer = view.chunk.layers[layer]
            if chunk_layer.tier is not Tier.HOST or chunk_layer.prefetched is not None:
                continue
            with torch.cuda.stream(self._copy_stream):  # ordered after this layer's D2H copy
                chunk_layer.prefetched = {
                    name: chunk_layer.tensors[name].to(self.device, non_blocking=True) for name in names
                }
                chunk_layer.prefetch_done = torch.cuda.Event()
                chunk_layer.prefetch_done.record(self._copy_stream)

    def _on_device(self, chunk_layer: ChunkLayer, name: str) -> torch.Tensor:
        if chunk_layer.tier is Tier.DEVICE or not self._cuda:
            return chunk_layer.tensors[name]
        current = torch.cuda.current_stream(self.device)
        if chunk_layer.prefetched is not None and name in chunk_layer.prefetched:
            current.wait_event(chunk_layer.prefetch_done)
            tensor = chunk_layer.prefetched.pop(name)
            tensor.record_stream(current)
            if not chunk_layer.prefetched:
                chunk_layer.prefetched = chunk_layer.prefetch_done = None
            return tensor
        if chunk_layer.copy_done is not None:
            current.wait_event(chunk_layer.copy_done)  # the host copy may still be in flight
        return chunk_layer.tensors[name].to(self.device, non_blocking=True)

    def move_layer_to_host(self, chunk: RecordedChunk, layer: int) -> bool:
        """Move one layer of a chunk to the host tier now (as eviction would); False if impossible."""
        chunk_layer = chunk.layers[layer]
        if chunk_layer.tier is Tier.HOST or not self._make_host_room(chunk_layer.nbytes, protect=chunk):
            return False
        chunk.layers[layer] = self._to_host(chunk_layer)
        self.device_bytes -= chunk_layer.nbytes
        self.host_bytes += chunk_layer.nbytes
        self.counters.layers_moved_to_host += 1
        self._note_peaks()
        return True

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "device_budget_bytes": self.device_budget_bytes,
            "host_budget_bytes": self.host_budget_bytes,
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "chunks": len(self.chunks),
            "tokens": sum(chunk.num_tokens for chunk in self.chunks.values()),
            **self.counters.__dict__,
        }

    # --- internals ---------------------------------------------------------------------------

    def _note_peaks(self) -> None:
        self.counters.peak_device_bytes = max(self.counters.peak_device_bytes, self.device_bytes)
        self.counters.peak_host_bytes = max(self.counters.peak_host_bytes, self.host_bytes)

    def _make_device_room(self, nbytes: int, protect: RecordedChunk | None) -> bool:
        if nbytes > self.device_budget_bytes:
            return False
        while self.device_bytes + nbytes > self.device_budget_bytes:
            victim = min(
                (c for c in self.chunks.values() if c is not protect and c.tier_bytes(Tier.DEVICE) > 0),
                key=lambda c: c.last_used,
                default=None,
            )
            if victim is None:
                return False
            first_on_device = next(i for i, layer in enumerate(victim.layers) if layer.tier is Tier.DEVICE)
            if not self.move_layer_to_host(victim, first_on_device):
                self._drop(victim)  # no host room even after dropping older chunks
        return True

    def _make_host_room(self, nbytes: int, protect: RecordedChunk | None) -> bool:
        if nbytes > self.host_budget_bytes:
            return False
        while self.host_bytes + nbytes > self.host_budget_bytes:
            victim = min(
                (c for c in self.chunks.values() if c is not protect and c.tier_bytes(Tier.HOST) > 0),
                key=lambda c: c.last_used,
                default=None,
            )
            if victim is None:
                return False
            self._drop(victim)
        return True

    def _to_host(self, layer: ChunkLayer) -> ChunkLayer:
        if not self._cuda:
            return ChunkLayer(layer.tensors, Tier.HOST, layer.nbytes)
        host = {}
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            for name, tensor in layer.tensors.items():
                host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host[name].copy_(tensor, non_blocking=True)
                tensor.record_stream(self._copy_stream)  # device memory is reused only after the copy
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return ChunkLayer(host, Tier.HOST, layer.nbytes, copy_done=event)

    def _uncount(self, layer: ChunkLayer) -> None:
        if layer.tier is Tier.DEVICE:
            self.device_bytes -= layer.nbytes
        else:
            self.host_bytes -= layer.nbytes

    def _remove(self, chunk: RecordedChunk) -> None:
        for layer in chunk.layers:
            self._uncount(layer)
        chunk.layers = []
        chunk.final_hidden = None
        self.chunks.pop(chunk.chunk_id, None)
        still_owned = self._slot_owner[chunk.slots] == chunk.chunk_id
        self._slot_owner[chunk.slots[still_owned]] = -1

    def _drop(self, chunk: RecordedChunk) -> None:
        chunk.dropped = True
        self._remove(chunk)
        self.counters.chunks_dropped += 1
