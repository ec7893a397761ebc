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
"""

from __future__ import annotations

import torch

PAGE_ROWS = 16


class TierPool:
    """One tier: ``slabs[layer][name]`` of shape [pages, PAGE_ROWS, width], and a free list per layer."""

    def __init__(self, widths: dict[str, int], num_layers: int, budget_bytes: int, dtype: torch.dtype,
                 device: torch.device, pin: bool = False) -> None:
        element = torch.empty(0, dtype=dtype).element_size()
        self.page_bytes = PAGE_ROWS * sum(widths.values()) * element  # one page of one layer
        self.pages = max(0, budget_bytes // self.page_bytes // max(num_layers, 1))
        self.widths = widths
        self.device = device
        self.budget_bytes = budget_bytes
        self.slabs: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros(self.pages, PAGE_ROWS, width, dtype=dtype, device=device, pin_memory=pin)
             for name, width in widths.items()}
            for _ in range(num_layers)
        ]
        # a stack per layer; popping from the end hands out low page numbers first
        self._free: list[list[int]] = [list(range(self.pages - 1, -1, -1)) for _ in range(num_layers)]

    @property
    def capacity_bytes(self) -> int:
        return self.pages * self.page_bytes * len(self.slabs)

    def free_pages(self, layer: int) -> int:
        return len(self._free[layer])

    def used_bytes(self) -> int:
        return sum((self.pages - len(free)) * self.page_bytes for free in self._free)

    def allocate(self, layer: int, count: int) -> torch.Tensor | None:
        free = self._free[layer]
        if count > len(free):
            return None
        taken = [free.pop() for _ in range(count)]
        return torch.tensor(taken, dtype=torch.int64)

    def release(self, layer: int, pages: torch.Tensor) -> None:
        self._free[layer].extend(reversed(pages.tolist()))

    # --- bytes --------------------------------------------------------------------------------

    def write(self, layer: int, pages: torch.Tensor, name: str, rows: torch.Tensor) -> None:
        """Write ``rows`` ([n, width], any device/strides) at row 0.. of ``pages``."""
        slab = self.slabs[layer][name]
        count = rows.shape[0]
        full, tail = divmod(count, PAGE_ROWS)
        if full:
            target = pages[:full].to(slab.device, non_blocking=True)
            slab.index_copy_(0, target, rows[: full * PAGE_ROWS].reshape(full, PAGE_ROWS, rows.shape[1]).to(slab.dtype))
        if tail:
            slab[int(pages[full])][:tail].copy_(rows[full * PAGE_ROWS :], non_blocking=True)

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
