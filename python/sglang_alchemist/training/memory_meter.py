"""Measuring the bytes autograd keeps for backward ("saved activations"), on any device.

``torch.autograd.graph.saved_tensors_hooks`` sees every tensor a graph saves; each is counted
once per storage while any saved reference to it is alive, and the peak of the live total is
kept. On CUDA ``torch.cuda.max_memory_allocated`` gives the device-wide peak as well; this
meter isolates what training *itself* keeps, which is also what it would keep on a GPU.

Weights are not activations: autograd saves the frozen weight of every projection (its input
gradient needs it) and the adapter's own parameters, but they exist whether or not training runs.
Pass them as ``exclude`` (``storages_of(model, adapter)``) so only activations are counted.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import defaultdict
from collections.abc import Iterable

import torch


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _storage_key(tensor: torch.Tensor) -> int:
    storage = tensor.untyped_storage()
    return storage.data_ptr() if storage.data_ptr() else id(storage)


def storages_of(*objects) -> set[int]:
    """Storage keys of every tensor reachable from dataclasses, modules, lists and dicts."""
    keys: set[int] = set()
    pending = list(objects)
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            keys.add(_storage_key(item))
        elif isinstance(item, torch.nn.Module):
            pending.extend(item.parameters())
            pending.extend(item.buffers())
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            pending.extend(getattr(item, field.name) for field in dataclasses.fields(item))
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, Iterable) and not isinstance(item, str | bytes):
            pending.extend(item)
    return keys


class SavedTensorMeter:
    def __init__(self, exclude: set[int] | None = None) -> None:
        self.exclude = exclude or set()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[int, int] = defaultdict(int)
        self._sizes: dict[int, int] = {}
        self._context = None

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        key = _storage_key(tensor)
        if key in self.exclude:
            return tensor
        if self._refs[key] == 0:
            self._sizes[key] = tensor.untyped_storage().nbytes()
            self.live_bytes += self._sizes[key]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._refs[key] += 1
        saved = _Saved(tensor)
        weakref.finalize(saved, self._release, key)
        return saved

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live_bytes -= self._sizes.pop(key)
            del self._refs[key]

    @staticmethod
    def _unpack(saved: _Saved | torch.Tensor) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def note_extra(self, nbytes: int) -> None:
        """Count bytes held outside autograd (e.g. a record layer loaded for its backward) at this moment."""
        self.peak_bytes = max(self.peak_bytes, self.live_bytes + nbytes)

    def __enter__(self) -> SavedTensorMeter:
        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
