"""The activation pool: preallocated slabs for recorded rows, one per tier, layer and tensor.

Modelled on SGLang's own KV pools: memory is allocated once at start-up, sized by the
budgets (``--alchemist-activation-device-mb`` on the serving device, ``--alchemist-activation-
host-mb`` in host memory, pinned on CUDA), and what is stored is referred to by *indices*, not
by tensors. The unit is a page of :data:`PAGE_ROWS` rows (prompt tokens); a chunk's layer owns
a list of pages in one tier. Capture writes a forward's recorded rows straight into their pages
(one copy, no allocation per request, no first-touch page faults: the slabs are zero-filled at
start-up); the trainer reads rows back by gathering pages.

A :class:`TierPool` knows nothing about chunks, owners or eviction - that is
``memory/store.py``; it only hands out and takes back pages, per layer, and moves bytes.

Two tiers in the same memory share their slabs (:meth:`TierPool.pair`): on CPU the "device"
tier is RAM like the host tier, so each tier is a *quota* of pages drawn from one stock, and a
tier move is bookkeeping (:meth:`TierPool.hand_over`) instead of a copy of every byte. Each
budget still holds: a tier never holds more pages than its own quota.
"""

from __future__ import annotations

import torch

PAGE_ROWS = 16


class TierPool:
    """One tier: ``slabs[layer][name]`` of shape [pages, PAGE_ROWS, width], and at most ``pages`` of them per layer.

    ``widths[layer]``: the tensors a layer stores (layers may store different ones: the frozen
    trunk's layers only their keys and values). ``pages`` is the tier's quota, the same for every
    layer (a chunk takes as many pages in each); the page numbers themselves come from a stock of
    free pages per layer, which a pool either owns or shares with the other tier of a :meth:`pair`.
    """

    def __init__(self, widths: list[dict[str, int]], budget_bytes: int, dtype: torch.dtype,
                 device: torch.device, pin: bool = False, _stock: _PageStock | None = None) -> None:
        self.layer_page_bytes = [_page_bytes(layer, dtype) for layer in widths]  # one page of each layer
        self.pages = _quota(budget_bytes, sum(self.layer_page_bytes))
        self.widths = widths
        self.device = device
        self.budget_bytes = budget_bytes
        self._stock = _stock or _PageStock(widths, self.pages, dtype, device, pin)
        self.slabs = self._stock.slabs
        self._used = [0] * len(widths)

    @classmethod
    def pair(cls, widths: list[dict[str, int]], budget_a: int, budget_b: int, dtype: torch.dtype,
             device: torch.device) -> tuple[TierPool, TierPool]:
        """Two tiers in the same memory: one set of slabs, a quota each, moves without copies."""
        page_bytes = sum(_page_bytes(layer, dtype) for layer in widths)
        pages = sum(_quota(budget, page_bytes) for budget in (budget_a, budget_b))
        stock = _PageStock(widths, pages, dtype, device, pin=False)
        return (cls(widths, budget_a, dtype, device, _stock=stock),
                cls(widths, budget_b, dtype, device, _stock=stock))

    def shares_slabs_with(self, other: TierPool) -> bool:
        return self._stock is other._stock

    @property
    def capacity_bytes(self) -> int:
        return self.pages * sum(self.layer_page_bytes)

    def free_pages(self, layer: int) -> int:
        return self.pages - self._used[layer]

    def used_bytes(self) -> int:
        return sum(used * size for used, size in zip(self._used, self.layer_page_bytes, strict=True))

    def allocate(self, layer: int, count: int) -> torch.Tensor | None:
        if count > self.free_pages(layer):
            return None
        free = self._stock.free[layer]
        taken = [free.pop() for _ in range(count)]
        self._used[layer] += count
        return torch.tensor(taken, dtype=torch.int64)

    def release(self, layer: int, pages: torch.Tensor) -> None:
        self._stock.free[layer].extend(reversed(pages.tolist()))
        self._used[layer] -= int(pages.numel())

    def hand_over(self, layer: int, pages: torch.Tensor, destination: TierPool) -> bool:
        """Move pages to a tier sharing these slabs, bytes untouched; False if its quota is full."""
        count = int(pages.numel())
        if not self.shares_slabs_with(destination) or count > destination.free_pages(layer):
            return False
        self._used[layer] -= count
        destination._used[layer] += count
        return True

    # --- bytes --------------------------------------------------------------------------------

    def write(self, layer: int, pages: torch.Tensor, name: str, rows: torch.Tensor) -> None:
        """Write ``rows`` ([n, width], any device/strides) at row 0.. of ``pages``.

        Each run of consecutive page numbers (a fresh chunk's pages usually form one: the free
        stack hands out low numbers first) is one strided copy straight from the forward's
        tensor, with no contiguous temporary for column slices such as q, k and v.
        """
        slab = self.slabs[layer][name]
        count = rows.shape[0]
        numbers = pages[: pages_for(count)].tolist()
        first = 0
        while first < len(numbers):
            last = first
            while last + 1 < len(numbers) and numbers[last + 1] == numbers[last] + 1:
                last += 1
            low, high = first * PAGE_ROWS, min(count, (last + 1) * PAGE_ROWS)
            target = slab[numbers[first] : numbers[last] + 1].view(-1, slab.shape[-1])
            target[: high - low].copy_(rows[low:high], non_blocking=True)
            first = last + 1

    def read(self, layer: int, pages: torch.Tensor, name: str, start: int, end: int) -> torch.Tensor:
        """Rows ``[start, end)`` of a chunk layer stored in ``pages`` (a copy unless one page holds them)."""
        slab = self.slabs[layer][name]
        first, last = start // PAGE_ROWS, (end - 1) // PAGE_ROWS + 1
        offset = start - first * PAGE_ROWS
        if last - first == 1:
            return slab[int(pages[first])][offset : offset + end - start]
        gathered = slab.index_select(0, pages[first:last].to(slab.device))
        return gathered.view(-1, slab.shape[-1])[offset : offset + end - start]

    def copy_pages(self, layer: int, pages: torch.Tensor, destination: TierPool, destination_pages: torch.Tensor,
                   non_blocking: bool = False) -> None:
        """Copy every tensor of ``pages`` into ``destination_pages`` of another tier (a tier move)."""
        for name, slab in self.slabs[layer].items():
            source = slab.index_select(0, pages.to(slab.device))
            target = destination.slabs[layer][name]
            target.index_copy_(0, destination_pages.to(target.device), source.to(target.device, non_blocking=non_blocking))


def pages_for(rows: int) -> int:
    return (rows + PAGE_ROWS - 1) // PAGE_ROWS


def _page_bytes(widths: dict[str, int], dtype: torch.dtype) -> int:
    return PAGE_ROWS * sum(widths.values()) * torch.empty(0, dtype=dtype).element_size()


def _quota(budget_bytes: int, page_bytes_all_layers: int) -> int:
    """Pages per layer that a byte budget buys (a page in every layer costs ``page_bytes_all_layers``)."""
    return max(0, budget_bytes // max(page_bytes_all_layers, 1))


class _PageStock:
    """The slabs and the free page numbers of each layer, owned by one tier or shared by a pair."""

    def __init__(self, widths: list[dict[str, int]], pages: int, dtype: torch.dtype, device: torch.device,
                 pin: bool) -> None:
        self.slabs: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros(pages, PAGE_ROWS, width, dtype=dtype, device=device, pin_memory=pin)
             for name, width in layer.items()}
            for layer in widths
        ]
        # a stack per layer; popping from the end hands out low page numbers first
        self.free: list[list[int]] = [list(range(pages - 1, -1, -1)) for _ in widths]
