"""The activation store: recorded prefill chunks in a device tier and a host tier of preallocated pages.

Unit of storage: a :class:`RecordedChunk` - the recorded rows of one request's prefill forward
(a whole prompt, or one piece of a chunked prefill), all layers, plus the KV slot index of each
row. Its bytes live in the pool (``memory/pool.py``): per layer, a list of pages in one tier.

Samples (``SampleActivations``) reference rows of one or more chunks; chunks are
reference-counted and their pages go back to the pool when no sample needs them.

What each layer keeps: the layers training adapts, from ``first_layer`` (the first adapted one,
``--alchemist-lora-layers``), keep every tensor the replay reads; the frozen trunk below it is
never run backward, so its layers keep only their keys and values (:data:`TRUNK_TENSORS`): rows
training must compute (a target, an earlier answer in a conversation) attend to the recorded
rows' keys and values in every layer, trunk included. With the default top third of SmolLM2 a
token's record is 255 KiB instead of 675 (docs/NOTES.md, "Recording only what training reads").

Keys and ownership. Each row is indexed by its KV slot (the radix cache's index space: a
prefix-cache hit hands a new request the slots of its cached prefix, and the store finds the
rows recorded for them, ``slot -> (chunk, row)``, kept beside SGLang's slots). A slot can be
freed by SGLang and reused for another request's tokens, so a hit is trusted only if the chunk
that recorded the slot was made (a) for the same token ids at every position up to and
including that row and (b) with the same adapter version: values of a causal model at
position i depend on exactly those. Rows that fail the check, or were never recorded (the
earlier *responses* of a conversation: decode records nothing), are holes in the sample's
record; the trainer computes just those rows and replays the rest.

Tiers and eviction (the pool's sizes are the budgets, so they can never be exceeded):
- New chunks go to the device tier, last layers first. When a layer's device pages run out,
  the least recently used chunk moves to the host tier one layer at a time, **first layers
  first** (the backward reads them last, so they have the longest time to come back): a
  chunk's device layers are always a suffix of its layers.
- When the host tier is full, the chunk used longest ago is dropped entirely - the oldest
  sample's, unless a newer request reused its rows (a shared system prompt is reused by every
  request, so it stays); samples that used it compute those rows when trained.
- **Pinned** chunks (in use by a training step) and chunks being filled by a forward are never
  moved or dropped: a step never loses rows between two of its slices.
- A chunk that fits nowhere is not stored (its request trains by computing its rows).

Threads: the scheduler thread records and evicts, the training thread reads and releases; all
bookkeeping happens under ``lock``. Page contents are written without it (a chunk's pages belong
to it alone until it is released) and read without it (the reader pins the chunk first).
On CUDA the host tier is pinned memory and moves run on a side stream ordered by events; on CPU
both tiers are RAM, so they share one set of slabs (``TierPool.pair``, a page quota each) and a
move changes the pages' tier without copying a byte (``bytes_copied_to_host`` stays 0).
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from enum import StrEnum

import torch

from sglang_alchemist.memory.pool import TierPool, pages_for

TRUNK_TENSORS = ("k", "v")  # what a frozen trunk layer keeps: what computed rows attend to

logger = logging.getLogger(__name__)


class Tier(StrEnum):
    DEVICE = "device"
    HOST = "host"


@dataclass
class ChunkLayer:
    tier: Tier
    pages: torch.Tensor  # int64 CPU: page indices in the tier's pool for this layer


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
    pins: int = 0  # training steps reading it right now
    filling: bool = True  # a forward is writing its rows (not yet findable by slot)
    dropped: bool = False

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def evictable(self) -> bool:
        return not (self.filling or self.pins or self.dropped)


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
    chunks_not_stored: int = 0  # did not fit in device + host pages
    layers_moved_to_host: int = 0
    bytes_copied_to_host: int = 0  # 0 on CPU, where the tiers share slabs and a move copies nothing
    chunks_dropped: int = 0  # host tier full: dropped (samples compute those rows)
    chunks_released: int = 0  # no sample needs them any more
    prefix_lookups: int = 0
    prefix_hits: int = 0  # every cached prefix row found and valid
    prefix_missing: int = 0  # some cached prefix row was never recorded (or was dropped): a hole
    prefix_slot_reused: int = 0  # a slot's record belonged to other tokens or another version
    prefix_rows_shared: int = 0  # rows a new request found already recorded (stored once)
    layers_loaded_from_host: int = 0
    peak_device_bytes: int = 0
    peak_host_bytes: int = 0


class ActivationStore:
    def __init__(self, device: torch.device, device_budget_bytes: int, host_budget_bytes: int, kv_slots: int,
                 widths: dict[str, int], num_layers: int, dtype: torch.dtype, first_layer: int = 0) -> None:
        """``widths``: an adapted layer's tensors; layers below ``first_layer`` keep :data:`TRUNK_TENSORS` of them."""
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self.num_layers = num_layers
        self.first_layer = first_layer
        self.widths = widths
        self.layer_widths = [widths if layer >= first_layer else {n: w for n, w in widths.items() if n in TRUNK_TENSORS}
                             for layer in range(num_layers)]
        widths = self.layer_widths
        self.element_size = torch.empty(0, dtype=dtype).element_size()
        if self.device.type == "cpu":  # both tiers are RAM: one set of slabs, a move is bookkeeping
            self.device_pool, self.host_pool = TierPool.pair(widths, device_budget_bytes,
                                                             host_budget_bytes, dtype, self.device)
        else:
            self.device_pool = TierPool(widths, device_budget_bytes, dtype, self.device)
            self.host_pool = TierPool(widths, host_budget_bytes, dtype, torch.device("cpu"),
                                      pin=self._cuda)
        self.device_budget_bytes = device_budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self.chunks: dict[int, RecordedChunk] = {}
        self.counters = StoreCounters()
        self.lock = threading.RLock()
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)
        self._slot_owner = torch.full((kv_slots,), -1, dtype=torch.int64)
        self._slot_row = torch.zeros(kv_slots, dtype=torch.int64)
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._pending_device_free: list[tuple[torch.cuda.Event, int, torch.Tensor]] = []
        # CUDA: host-tier layers brought to the device ahead of their backward: (chunk, layer) -> copies
        self._prefetched: dict[tuple[int, int], tuple[dict[str, torch.Tensor], torch.cuda.Event]] = {}

    def records(self, layer: int, name: str) -> bool:
        """Whether layer ``layer`` keeps tensor ``name``."""
        return 0 <= layer < self.num_layers and name in self.layer_widths[layer]

    def _check(self, layer: int, names) -> None:
        missing = [name for name in names if not self.records(layer, name)]
        if missing:
            raise KeyError(f"layer {layer} does not keep {', '.join(missing)} (layers below the first adapted "
                           f"layer {self.first_layer} keep {', '.join(TRUNK_TENSORS)} only)")

    def pool(self, tier: Tier) -> TierPool:
        return self.device_pool if tier is Tier.DEVICE else self.host_pool

    @property
    def device_bytes(self) -> int:
        return self.device_pool.used_bytes()

    @property
    def host_bytes(self) -> int:
        return self.host_pool.used_bytes()

    # --- admission ------------------------------------------------------------------------

    def begin_chunk(self, owner: str, start: int, prompt_ids: torch.Tensor, slots: torch.Tensor,
                    adapter_version: int) -> RecordedChunk | None:
        """Reserve pages for a chunk a forward is about to record; None when it fits nowhere.

        The last layers take the device tier first; room is made by moving least recently used
        chunks to the host tier (first layers first) and dropping the oldest host chunks.
        """
        rows = int(slots.numel())
        count = pages_for(rows)
        with self.lock:
            self._reclaim_device_pages(wait=False)
            now = next(self._clock)
            chunk = RecordedChunk(
                chunk_id=next(self._ids), owner=owner, start=start, num_tokens=rows, prompt_ids=prompt_ids,
                slots=slots.to("cpu", torch.int64), adapter_version=adapter_version, layers=[],
                final_hidden=None, created=now, last_used=now,
            )
            placed: list[ChunkLayer | None] = [None] * self.num_layers
            device_ok = True  # once a layer goes to the host, every layer below it does too
            for layer in reversed(range(self.num_layers)):
                pages = self._allocate(Tier.DEVICE, layer, count) if device_ok else None
                tier = Tier.DEVICE
                if pages is None:
                    device_ok = False
                    pages, tier = self._allocate(Tier.HOST, layer, count), Tier.HOST
                if pages is None:
                    for index, done in enumerate(placed):
                        if done is not None:
                            self.pool(done.tier).release(index, done.pages)
                    self.counters.chunks_not_stored += 1
                    return None
                placed[layer] = ChunkLayer(tier, pages)
            chunk.layers = list(placed)  # type: ignore[arg-type]
            self.chunks[chunk.chunk_id] = chunk
            self._note_peaks()
            return chunk

    def write(self, chunk: RecordedChunk, layer: int, name: str, rows: torch.Tensor) -> None:
        """Capture: write one layer's tensor for the chunk's rows (no lock: the pages are its own)."""
        chunk_layer = chunk.layers[layer]
        self.pool(chunk_layer.tier).write(layer, chunk_layer.pages, name, rows)

    def commit_chunk(self, chunk: RecordedChunk, final_hidden: torch.Tensor | None) -> None:
        """The forward finished writing: the chunk becomes findable by its slots."""
        with self.lock:
            chunk.final_hidden = final_hidden
            chunk.filling = False
            self._slot_owner[chunk.slots] = chunk.chunk_id
            self._slot_row[chunk.slots] = torch.arange(chunk.num_tokens)
            self.counters.chunks_stored += 1

    def abort_chunk(self, chunk: RecordedChunk) -> None:
        with self.lock:
            if chunk.chunk_id in self.chunks:
                self._remove(chunk)

    # --- references -----------------------------------------------------------------------

    def acquire(self, views: list[ChunkView]) -> None:
        with self.lock:
            for view in views:
                view.chunk.refcount += 1

    def release(self, views: list[ChunkView]) -> None:
        with self.lock:
            for view in views:
                chunk = view.chunk
                chunk.refcount -= 1
                if chunk.refcount <= 0 and not chunk.dropped and not chunk.filling:
                    self._remove(chunk)
                    self.counters.chunks_released += 1

    def pin(self, views: list[ChunkView]) -> list[ChunkView]:
        """Protect a sample's chunks for a training step; returns the views still backed by rows."""
        with self.lock:
            live = [view for view in views if not view.chunk.dropped]
            for view in live:
                view.chunk.pins += 1
            return live

    def unpin(self, views: list[ChunkView]) -> None:
        with self.lock:
            for view in views:
                view.chunk.pins -= 1

    def touch(self, chunk: RecordedChunk) -> None:
        chunk.last_used = next(self._clock)

    # --- prefix lookup --------------------------------------------------------------------

    def lookup_prefix(self, prompt_ids: torch.Tensor, prefix_slots: torch.Tensor,
                      adapter_version: int) -> tuple[list[ChunkView], str | None]:
        """Views of the recorded rows of positions [0, len(prefix_slots)) and why any are missing.

        Rows never recorded, dropped, or recorded for other tokens / another adapter version are
        left out (holes); the reason is that of the first hole, or None when every row was found.
        """
        with self.lock:
            self.counters.prefix_lookups += 1
            if prefix_slots.numel() == 0:
                return [], None
            slots = prefix_slots.to("cpu", torch.int64)
            owners = self._slot_owner[slots]
            rows = self._slot_row[slots]
            breaks = torch.nonzero((owners[1:] != owners[:-1]) | (rows[1:] != rows[:-1] + 1)).flatten() + 1
            bounds = [0, *breaks.tolist(), int(slots.numel())]
            views: list[ChunkView] = []
            reason = None
            missing = reused = False
            for run_start, run_end in itertools.pairwise(bounds):
                chunk = self.chunks.get(int(owners[run_start])) if int(owners[run_start]) >= 0 else None
                if chunk is None or chunk.dropped or chunk.filling:
                    missing = True
                    reason = reason or "prefix_not_recorded"
                    continue
                row_start = int(rows[run_start])
                view = ChunkView(chunk, row_start, row_start + run_end - run_start)
                valid = (
                    view.position_start == run_start
                    and chunk.adapter_version == adapter_version
                    and chunk.prompt_ids.numel() >= view.position_end
                    and torch.equal(chunk.prompt_ids[: view.position_end], prompt_ids[: view.position_end])
                )
                if not valid:
                    reused = True
                    reason = reason or "slot_reused"
                    continue
                views.append(view)
            for view in views:
                self.touch(view.chunk)  # rows shared by a new request are as recent as it is
            self.counters.prefix_rows_shared += sum(v.row_end - v.row_start for v in views)
            # once per lookup: how many requests found holes, not how many runs
            self.counters.prefix_missing += int(missing)
            self.counters.prefix_slot_reused += int(reused)
            if reason is None:
                self.counters.prefix_hits += 1
            return views, reason

    # --- loading for the trainer ----------------------------------------------------------

    def read(self, view: ChunkView, layer: int, names: tuple[str, ...], start: int, end: int) -> dict[str, torch.Tensor]:
        """Positions [start, end) (inside ``view``) of one layer, on the compute device."""
        self._check(layer, names)
        chunk_layer = view.chunk.layers[layer]
        first = start - view.chunk.start
        last = end - view.chunk.start
        self.touch(view.chunk)
        prefetched = self._prefetched.get((view.chunk.chunk_id, layer)) if self._cuda else None
        if prefetched is not None and all(name in prefetched[0] for name in names):
            copies, done = prefetched
            torch.cuda.current_stream(self.device).wait_event(done)
            self.counters.layers_loaded_from_host += 1
            return {name: copies[name].view(-1, copies[name].shape[-1])[first:last] for name in names}
        pool = self.pool(chunk_layer.tier)
        tensors = {name: pool.read(layer, chunk_layer.pages, name, first, last) for name in names}
        if chunk_layer.tier is Tier.HOST:
            self.counters.layers_loaded_from_host += 1
            if self._cuda:
                tensors = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
        return tensors

    def prefetch(self, view: ChunkView, layer: int, names: tuple[str, ...]) -> None:
        """CUDA: start copying a host-tier layer of a pinned chunk to the device on the copy stream.

        The backward reads layers last to first and prefetches the next one while the current
        one computes; each page is a slice of the pinned host slab, so every copy is asynchronous.
        ``release_prefetch`` frees the copies once the step is done with the chunk.
        """
        self._check(layer, names)
        chunk_layer = view.chunk.layers[layer]
        key = (view.chunk.chunk_id, layer)
        if not self._cuda or chunk_layer.tier is not Tier.HOST or key in self._prefetched:
            return
        slabs = self.host_pool.slabs[layer]
        pages = chunk_layer.pages.tolist()
        with torch.cuda.stream(self._copy_stream):
            copies = {}
            for name in names:
                slab = slabs[name]
                target = torch.empty((len(pages), *slab.shape[1:]), dtype=slab.dtype, device=self.device)
                for index, page in enumerate(pages):
                    target[index].copy_(slab[page], non_blocking=True)
                copies[name] = target
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        self._prefetched[key] = (copies, done)

    def release_prefetch(self, views: list[ChunkView]) -> None:
        ids = {view.chunk.chunk_id for view in views}
        for key in [key for key in self._prefetched if key[0] in ids]:
            copies, done = self._prefetched.pop(key)
            for tensor in copies.values():
                tensor.record_stream(torch.cuda.current_stream(self.device))

    def move_layer_to_host(self, chunk: RecordedChunk, layer: int) -> bool:
        """Move one layer of a chunk to the host tier now (as eviction would); False if impossible."""
        with self.lock:
            return self._demote(chunk, layer, protect=chunk)

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict:
        with self.lock:
            live = [c for c in self.chunks.values() if not c.dropped]
            return {
                "device_budget_bytes": self.device_budget_bytes,
                "host_budget_bytes": self.host_budget_bytes,
                "device_capacity_bytes": self.device_pool.capacity_bytes,
                "host_capacity_bytes": self.host_pool.capacity_bytes,
                "device_bytes": self.device_bytes,
                "host_bytes": self.host_bytes,
                "adapted_layers_recorded": [self.first_layer, self.num_layers - 1],
                "trunk_layers_keep": list(TRUNK_TENSORS) if self.first_layer else [],
                "chunks": len(live),
                "tokens": sum(chunk.num_tokens for chunk in live),
                "pinned_chunks": sum(1 for c in live if c.pins),
                **self.counters.__dict__,
            }

    # --- internals ---------------------------------------------------------------------------

    def _note_peaks(self) -> None:
        self.counters.peak_device_bytes = max(self.counters.peak_device_bytes, self.device_bytes)
        self.counters.peak_host_bytes = max(self.counters.peak_host_bytes, self.host_bytes)

    def _allocate(self, tier: Tier, layer: int, count: int) -> torch.Tensor | None:
        pool = self.pool(tier)
        if count > pool.pages:
            return None
        while pool.free_pages(layer) < count:
            if tier is Tier.DEVICE and self._pending_device_free:
                self._reclaim_device_pages(wait=True)
                continue
            if not self._evict_one(tier, layer):
                return None
        return pool.allocate(layer, count)

    def _lru(self, tier: Tier, layer: int) -> RecordedChunk | None:
        return min(
            (c for c in self.chunks.values() if c.evictable and c.layers[layer].tier is tier),
            key=lambda c: c.last_used, default=None,
        )

    def _evict_one(self, tier: Tier, layer: int) -> bool:
        """Free pages of ``layer`` in ``tier``: demote (device) or drop (host) the LRU chunk there."""
        victim = self._lru(tier, layer)
        if victim is None:
            return False
        if tier is Tier.HOST:
            self._drop(victim)
            return True
        # first layers first: every device layer of the victim up to ``layer`` leaves together
        for index in range(layer + 1):
            if victim.layers[index].tier is Tier.DEVICE and not self._demote(victim, index, protect=victim):
                self._drop(victim)  # no host room even after dropping older chunks
                return True
        return True

    def _demote(self, chunk: RecordedChunk, layer: int, protect: RecordedChunk) -> bool:
        chunk_layer = chunk.layers[layer]
        if chunk_layer.tier is Tier.HOST:
            return False
        count = int(chunk_layer.pages.numel())
        if count > self.host_pool.pages:
            return False
        while self.host_pool.free_pages(layer) < count:
            victim = min((c for c in self.chunks.values() if c.evictable and c is not protect
                          and c.layers[layer].tier is Tier.HOST), key=lambda c: c.last_used, default=None)
            if victim is None:
                return False
            self._drop(victim)
        if self.device_pool.hand_over(layer, chunk_layer.pages, self.host_pool):
            host_pages = chunk_layer.pages  # same slabs: the pages change tier, no byte moves
        else:
            host_pages = self.host_pool.allocate(layer, count)
            self.counters.bytes_copied_to_host += count * self.device_pool.layer_page_bytes[layer]
            if self._cuda:
                with torch.cuda.stream(self._copy_stream):
                    self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
                    self.device_pool.copy_pages(layer, chunk_layer.pages, self.host_pool, host_pages,
                                                non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._copy_stream)
                self._pending_device_free.append((event, layer, chunk_layer.pages))
            else:
                self.device_pool.copy_pages(layer, chunk_layer.pages, self.host_pool, host_pages)
                self.device_pool.release(layer, chunk_layer.pages)
        chunk.layers[layer] = ChunkLayer(Tier.HOST, host_pages)
        self.counters.layers_moved_to_host += 1
        self._note_peaks()
        return True

    def _reclaim_device_pages(self, wait: bool) -> None:
        """Device pages whose copy to the host finished go back to the device pool (CUDA)."""
        pending, self._pending_device_free = self._pending_device_free, []
        for event, layer, pages in pending:
            if wait:
                event.synchronize()
            if event.query():
                self.device_pool.release(layer, pages)
            else:
                self._pending_device_free.append((event, layer, pages))

    def _remove(self, chunk: RecordedChunk) -> None:
        for index, chunk_layer in enumerate(chunk.layers):
            self.pool(chunk_layer.tier).release(index, chunk_layer.pages)
        chunk.layers = []
        chunk.final_hidden = None
        self.chunks.pop(chunk.chunk_id, None)
        still_owned = self._slot_owner[chunk.slots] == chunk.chunk_id
        self._slot_owner[chunk.slots[still_owned]] = -1

    def _drop(self, chunk: RecordedChunk) -> None:
        chunk.dropped = True
        self._remove(chunk)
        self.counters.chunks_dropped += 1

