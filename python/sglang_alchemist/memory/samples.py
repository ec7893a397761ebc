"""Served requests from their first prefill to their feedback (or expiry).

A request passes through two states here:

- *in flight* (:class:`RequestRecording`): prefill is running, maybe in several chunks; the
  views of its recorded rows accumulate (rows reused from a cached prefix plus rows recorded
  by each of its prefill forwards). Rows that could not be found or stored are holes.
- *served* (:class:`ServedSample`): the response is complete; the sample (prompt and response
  token ids, the adapter version that served it, its recorded rows if any) waits for
  feedback. It leaves when it is trained, or after ``--alchemist-feedback-ttl-s``, releasing
  its rows.

Every finished request becomes a ServedSample, recorded or not, so feedback on any response
this server produced can be trained; the trainer replays the recorded rows and computes the
rest. ``replay_blocker`` is the one name for *why some or all prompt rows must be computed*
(None: every row is recorded).

All methods take the store's lock: the scheduler thread adds and expires samples, the
training thread takes and releases them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from sglang_alchemist.memory.store import ActivationStore, ChunkView, Tier


@dataclass
class SampleActivations:
    """A sample's recorded prompt rows, as the trainer reads them (``training.step`` protocol).

    ``views`` are sorted by position and may leave gaps (holes); a view whose chunk was dropped
    counts as a hole too.
    """

    store: ActivationStore
    views: list[ChunkView]
    num_tokens: int

    def live_views(self) -> list[ChunkView]:
        return [view for view in self.views if not view.chunk.dropped]

    def segments(self) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for view in self.live_views():
            if runs and runs[-1][1] == view.position_start:
                runs[-1] = (runs[-1][0], view.position_end)
            else:
                runs.append((view.position_start, view.position_end))
        return runs

    @property
    def rows_recorded(self) -> int:
        return sum(view.row_end - view.row_start for view in self.live_views())

    def load(self, layer: int, names: tuple[str, ...], start: int, end: int) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for view in self.live_views():
            lo, hi = max(start, view.position_start), min(end, view.position_end)
            if lo >= hi:
                continue
            for name, tensor in self.store.read(view, layer, names, lo, hi).items():
                parts[name].append(tensor)
        return {name: tensors[0] if len(tensors) == 1 else torch.cat(tensors) for name, tensors in parts.items()}

    def pin(self) -> SampleActivations | None:
        """The rows still recorded, protected from eviction for a training step (None: none left);
        ``unpin`` the result when the step is done."""
        pinned = self.store.pin(self.views)
        return SampleActivations(self.store, pinned, self.num_tokens) if pinned else None

    def unpin(self) -> None:
        self.store.release_prefetch(self.views)
        self.store.unpin(self.views)

    def prefetch(self, layer: int, names: tuple[str, ...]) -> None:
        """CUDA: start bringing a host-tier layer to the device (on CPU both tiers are RAM)."""
        for view in self.live_views():
            self.store.prefetch(view, layer, names)

    def on_device(self, layer: int) -> bool:
        return all(view.chunk.layers[layer].tier is Tier.DEVICE for view in self.live_views())

    def host_bytes(self, layer: int, names: tuple[str, ...]) -> int:
        per_row = sum(self.store.widths[name] for name in names) * self.store.element_size
        return sum((view.row_end - view.row_start) * per_row for view in self.live_views()
                   if view.chunk.layers[layer].tier is Tier.HOST)

    def final_hidden(self) -> torch.Tensor | None:
        live = self.live_views()
        if not live:
            return None
        last = live[-1]
        if last.position_end != self.num_tokens or last.row_end != last.chunk.num_tokens:
            return None
        return last.chunk.final_hidden

    def blocker(self) -> str | None:
        """Why some prompt rows are not recorded (they will be computed), or None."""
        if self.rows_recorded == 0:
            return "evicted" if self.views else "not_recorded"
        if len(self.live_views()) < len(self.views):
            return "evicted"
        if self.rows_recorded < self.num_tokens:
            return "incomplete"
        if self.final_hidden() is None:
            return "incomplete"
        return None


@dataclass
class RequestRecording:
    rid: str
    prompt_ids: torch.Tensor  # int64 CPU
    adapter_version: int
    active: bool  # chosen for recording (False: not chosen, or an adapter we do not train)
    views: list[ChunkView] = field(default_factory=list)
    covered_until: int = 0  # prompt positions handled so far (recorded or a hole)
    replay_blocker: str | None = None  # why some rows are missing (the first reason seen)
    started_at: float = field(default_factory=time.monotonic)

    def note_hole(self, reason: str) -> None:
        self.replay_blocker = self.replay_blocker or reason


@dataclass
class ServedSample:
    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    adapter_version: int
    finished_at: float
    activations: SampleActivations | None
    recorded_blocker: str | None  # why rows were missing when it finished (None: fully recorded)

    def replay_blocker(self) -> str | None:
        """Why some or all prompt rows cannot be replayed now (they will be computed), or None."""
        if self.activations is None:
            return self.recorded_blocker or "not_recorded"
        current = self.activations.blocker()
        return None if current is None else (self.recorded_blocker or current)

    def public(self) -> dict:
        blocker = self.replay_blocker()
        rows = self.activations.rows_recorded if self.activations is not None else 0
        return {
            "id": self.rid,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.output_ids),
            "adapter_version": self.adapter_version,
            "has_activations": rows > 0,
            "rows_recorded": rows,
            "replay_blocker": blocker,
        }


class SampleTable:
    def __init__(self, store: ActivationStore, ttl_s: float, max_served: int = 100_000) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_served = max_served
        self.in_flight: dict[str, RequestRecording] = {}
        self.served: OrderedDict[str, ServedSample] = OrderedDict()
        self.expired = 0

    # --- in flight --------------------------------------------------------------------------

    def recording(self, rid: str) -> RequestRecording | None:
        return self.in_flight.get(rid)

    def start(self, rid: str, prompt_ids: list[int], adapter_version: int, record: bool,
              reason: str | None = None) -> RequestRecording:
        with self.store.lock:
            previous = self.in_flight.pop(rid, None)
            if previous is not None:  # a client reused a request id: the new request replaces it
                self.store.release(previous.views)
            recording = RequestRecording(
                rid=rid, prompt_ids=torch.tensor(prompt_ids, dtype=torch.int64), adapter_version=adapter_version,
                active=record, replay_blocker=None if record else (reason or "not_recorded"),
            )
            self.in_flight[rid] = recording
            return recording

    def add_views(self, recording: RequestRecording, views: list[ChunkView]) -> None:
        with self.store.lock:
            self.store.acquire(views)
            recording.views = sorted([*recording.views, *views], key=lambda v: v.position_start)

    # --- finished -------------------------------------------------------------------------

    def finish(self, rid: str, prompt_ids: list[int], output_ids: list[int], finish_reason: str,
               adapter_version: int, now: float | None = None) -> ServedSample:
        with self.store.lock:
            recording = self.in_flight.pop(rid, None)
            activations, blocker = None, "not_recorded"
            if recording is not None:
                blocker = recording.replay_blocker
                if recording.views and recording.active:
                    activations = SampleActivations(self.store, recording.views, len(prompt_ids))
                elif recording.views:
                    self.store.release(recording.views)
                if recording.active and recording.covered_until < len(prompt_ids):
                    blocker = blocker or "incomplete"
            sample = ServedSample(
                rid=rid, prompt_ids=list(prompt_ids), output_ids=list(output_ids), finish_reason=finish_reason,
                adapter_version=adapter_version, finished_at=time.monotonic() if now is None else now,
                activations=activations, recorded_blocker=blocker,
            )
            previous = self.served.pop(rid, None)
            if previous is not None:  # the same id served again: feedback refers to the latest
                self.release_sample(previous)
            self.served[rid] = sample
            while len(self.served) > self.max_served:
                self.release(next(iter(self.served)))
                self.expired += 1
            return sample

    def abort(self, rid: str) -> None:
        with self.store.lock:
            recording = self.in_flight.pop(rid, None)
            if recording is not None:
                self.store.release(recording.views)

    def get(self, rid: str) -> ServedSample | None:
        return self.served.get(rid)

    def take(self, rid: str) -> ServedSample | None:
        """Remove a sample for training; its rows stay referenced until ``release_sample``."""
        with self.store.lock:
            return self.served.pop(rid, None)

    def release_sample(self, sample: ServedSample) -> None:
        with self.store.lock:
            if sample.activations is not None:
                self.store.release(sample.activations.views)
                sample.activations = None

    def release(self, rid: str) -> None:
        with self.store.lock:
            sample = self.served.pop(rid, None)
            if sample is not None:
                self.release_sample(sample)

    def expire(self, now: float | None = None) -> int:
        """Release samples that waited longer than the feedback TTL; returns how many.

        Also forgets in-flight recordings older than twice the TTL: a request SGLang dropped
        without our seeing it finish must not hold recorded chunks forever.
        """
        now = time.monotonic() if now is None else now
        with self.store.lock:
            for rid in [rid for rid, r in self.in_flight.items() if now - r.started_at > 2 * self.ttl_s]:
                self.abort(rid)
            count = 0
            while self.served:
                rid, sample = next(iter(self.served.items()))
                if now - sample.finished_at < self.ttl_s:
                    break
                self.release(rid)
                count += 1
            self.expired += count
            return count

    def status(self) -> dict:
        with self.store.lock:
            served = list(self.served.values())
            return {
                "in_flight": len(self.in_flight),
                "awaiting_feedback": len(served),
                "awaiting_feedback_with_activations": sum(
                    1 for s in served if s.activations is not None and s.activations.rows_recorded > 0),
                "expired": self.expired,
            }
