"""Gradient averaging over a dedicated gloo group, and the group's (re)formation after a crash.

:class:`GradientSync` is what the trainer sees (``Trainer.sync``): ``reduce_gradients`` replaces
every LoRA parameter's gradient by the weighted average over the replicas,
``sum_i w_i g_i / sum_i w_i`` (a replica with nothing to train passes ``w = 0`` and no
gradients). The same object carries the small collectives the lockstep rounds agree with
(``any``/``all`` of a flag, object all-gather and broadcast). With no sync object (a single
server) the trainer calls none of this.

The group is a ``ProcessGroupGloo`` built directly on a ``TCPStore`` (never SGLang's own
groups, never the default group): the launcher (``launch_cluster``) hosts the store; without a
launcher rank 0 hosts it when nothing listens at the address. Membership is by *generation*:
a replica that starts, or whose collective failed (a peer died: gloo sees the closed socket at
once), bumps the store's ``generation`` counter and waits until all ``size`` ranks have arrived
at the newest generation; then a fresh gloo group is created under that generation's prefix.
Bumps only go up and everyone follows the largest, so the replicas converge on one generation
once the restarted replica is back.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

GENERATION_KEY = "alchemist/generation"
POLL_S = 0.2


class ClusterBroken(RuntimeError):
    """A collective failed (a peer died or timed out): the round is abandoned, the group re-forms."""


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def host_store(addr: str, timeout_s: float = 300.0) -> dist.TCPStore:
    """The cluster's store, hosted by the calling process (the launcher)."""
    host, port = parse_addr(addr)
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s), multi_tenant=True)


def connect_store(addr: str, rank: int, timeout_s: float) -> dist.TCPStore:
    """A client of the store at ``addr``; rank 0 hosts it itself when nothing listens there."""
    host, port = parse_addr(addr)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10),
                                 wait_for_workers=False)
        except (RuntimeError, OSError) as error:
            if rank == 0:
                try:
                    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                         timeout=timedelta(seconds=timeout_s), multi_tenant=True)
                except (RuntimeError, OSError):
                    pass
            if time.monotonic() > deadline:
                raise ClusterBroken(f"cluster store {addr} unreachable: {error}") from error
            time.sleep(1.0)


class GradientSync:
    """One replica's side of the cluster group: weighted gradient all-reduce and agreement."""

    def __init__(self, rank: int, size: int, addr: str, timeout_s: float = 300.0,
                 store: dist.Store | None = None) -> None:
        self.rank = rank
        self.size = size
        self.addr = addr
        self.timeout_s = timeout_s
        self._store = store
        self.group: dist.ProcessGroup | None = None
        self.generation: int | None = None
        self.formations = 0
        self.failures = 0
        self.last_error: str | None = None
        self.bytes_reduced = 0
        self._lock = threading.Lock()

    # --- membership ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.group is not None

    def _store_client(self) -> dist.Store:
        if self._store is None:
            self._store = connect_store(self.addr, self.rank, self.timeout_s)
        return self._store

    def form(self) -> None:
        """Join (or re-join) the cluster: blocks until every rank is in one new generation."""
        with self._lock:
            self.group = None
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    store = self._store_client()
                    generation = store.add(GENERATION_KEY, 1)  # a (re)joining rank always starts a new one
                    while True:
                        store.set(f"alchemist/g{generation}/rank{self.rank}", b"1")
                        arrived = store.add(f"alchemist/g{generation}/arrived", 1)
                        while arrived < self.size:
                            time.sleep(POLL_S)
                            latest = store.add(GENERATION_KEY, 0)
                            if latest > generation:
                                break
                            arrived = store.add(f"alchemist/g{generation}/arrived", 0)
                        if arrived >= self.size:
                            break
                        generation = latest  # someone (re)joined after us: follow the newest generation
                    prefix = dist.PrefixStore(f"alchemist/g{generation}/pg/", store)
                    self.group = dist.ProcessGroupGloo(prefix, self.rank, self.size,
                                                       timedelta(seconds=self.timeout_s))
                    self.generation = generation
                    self.formations += 1
                    logger.info("sglang_alchemist: cluster rank %d/%d joined generation %d", self.rank,
                                self.size, generation)
                    return
                except (RuntimeError, OSError) as error:  # the store went away (its host restarted)
                    self._store = None
                    self.last_error = f"{type(error).__name__}: {error}"
                    if time.monotonic() > deadline:
                        raise ClusterBroken(f"could not join the cluster: {error}") from error
                    time.sleep(1.0)

    def generation_moved(self) -> bool:
        """Did some replica start a new generation (it restarted, or saw a failure)?"""
        if self._store is None or self.generation is None:
            return True
        try:
            return self._store.add(GENERATION_KEY, 0) != self.generation
        except (RuntimeError, OSError):
            return True

    def broken(self, error: BaseException | str) -> None:
        """Leave the group (peers blocked in a collective with us see it fail) and say why."""
        self.failures += 1
        self.last_error = str(error)
        group, self.group = self.group, None
        if group is not None:
            try:
                group.abort()
            except Exception:  # noqa: BLE001 - best effort: dropping the group closes its sockets too
                pass

    # --- collectives (the training thread only) -------------------------------------------------

    def _run(self, make_work) -> None:
        if self.group is None:
            raise ClusterBroken("not in a cluster group")
        try:
            make_work(self.group).wait()
        except RuntimeError as error:
            raise ClusterBroken(f"collective failed: {error}") from error

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        options = dist.AllreduceOptions()
        options.reduceOp = op
        self._run(lambda group: group.allreduce([tensor], options))
        return tensor

    def any(self, flag: bool) -> bool:
        return bool(self.all_reduce(torch.tensor([int(bool(flag))], dtype=torch.int64)).item() > 0)

    def all(self, flag: bool) -> bool:
        return bool(self.all_reduce(torch.tensor([int(bool(flag))], dtype=torch.int64)).item() == self.size)

    def all_gather_object(self, obj) -> list:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        self._run(lambda group: group.allgather([sizes], [torch.tensor([data.numel()], dtype=torch.int64)]))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: data.numel()] = data
        out = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.size)]
        self._run(lambda group: group.allgather([out], [padded]))
        return [pickle.loads(o[: int(s.item())].numpy().tobytes()) for o, s in zip(out, sizes, strict=True)]

    def broadcast_object(self, obj, root: int):
        options = dist.BroadcastOptions()
        options.rootRank = root
        payload = pickle.dumps(obj) if self.rank == root else b""
        size = torch.tensor([len(payload)], dtype=torch.int64)
        self._run(lambda group: group.broadcast([size], options))
        data = torch.zeros(int(size.item()), dtype=torch.uint8)
        if self.rank == root:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        self._run(lambda group: group.broadcast([data], options))
        return obj if self.rank == root else pickle.loads(data.numpy().tobytes())

    def reduce_gradients(self, params: list[torch.nn.Parameter], weight: float) -> float:
        """Every parameter's gradient becomes ``sum_i w_i g_i / sum_i w_i`` over the replicas.

        Returns the total weight (identical on every rank); 0 means nobody had anything to
        train, and the gradients are then zero.
        """
        parts = []
        for param in params:
            grad = param.grad
            if grad is None or weight == 0:
                parts.append(torch.zeros(param.numel(), dtype=torch.float32))
            else:
                parts.append(grad.detach().reshape(-1).to("cpu", torch.float32) * weight)
        parts.append(torch.tensor([float(weight)], dtype=torch.float32))
        flat = torch.cat(parts)
        self.all_reduce(flat)
        self.bytes_reduced += flat.numel() * 4
        total = float(flat[-1].item())
        if total > 0:
            flat[:-1] /= total
        offset = 0
        for param in params:
            count = param.numel()
            param.grad = flat[offset : offset + count].view_as(param).to(param.device, param.dtype).clone()
            offset += count
        return total

    def status(self) -> dict:
        return {"rank": self.rank, "size": self.size, "addr": self.addr, "ready": self.ready,
                "generation": self.generation, "formations": self.formations, "failures": self.failures,
                "last_error": self.last_error}
