"""Measuring the bytes autograd keeps for backward ("saved activations"), on any device.

``torch.autograd.graph.saved_tensors_hooks`` sees every tensor a graph saves; each is counted
once per storage while any saved reference to it is alive, and the peak of the live total is
kept. On CUDA ``torch.cuda.max_memory_allocated`` gives the device-wide peak as well; this
meter isolates what training *itself* keeps, which is also what it would keep on a GPU.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedTensorMeter:
    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[int, int] = defaultdict(int)
        self._sizes: dict[int, int] = {}
        self._context = None

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        storage = tensor.untyped_storage()
        key = storage.data_ptr() if storage.data_ptr() else id(storage)
        if self._refs[key] == 0:
            self._sizes[key] = storage.nbytes()
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
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def note_extra(self, nbytes: int) -> None:
        """Count bytes held outside autograd (e.g. a record layer loaded for its backward) at this moment."""
        self.peak_bytes = max(self.peak_bytes, self.live_bytes + nbytes)

    def __enter__(self) -> SavedTensorMeter:
        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
