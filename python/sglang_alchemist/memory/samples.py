"""Served requests from their first prefill to their feedback (or expiry).

A request passes through two states here:

- *in flight* (:class:`RequestRecording`): prefill is running, maybe in several chunks; the
  views of its recorded rows accumulate (rows reused from a cached prefix plus rows recorded
  by each of its prefill forwards).
- *served* (:class:`ServedSample`): the response is complete; the sample (prompt and response
  token ids, the adapter version that served it, its recorded activations if any) waits for
  feedback. It leaves when it is trained, or after ``--alchemist-feedback-ttl-s``, releasing
  its activations.

Every finished request becomes a ServedSample, recorded or not, so feedback on any response
this server produced can be trained (an unrecorded one by recomputation).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from sglang_alchemist.memory.store import ActivationStore, ChunkView, Tier


@dataclass
class SampleActivations:
    """A sample's recorded prompt rows, as the trainer reads them (``training.step`` protocol)."""

    store: ActivationStore
    views: list[ChunkView]
    num_tokens: int

    def load(self, layer: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return self.store.load_layer(self.views, layer, names)

    def prefetch(self, layer: int, names: tuple[str, ...]) -> None:
        self.store.prefetch_layer(self.views, layer, names)

    def on_device(self, layer: int) -> bool:
        return all(view.chunk.layers[layer].tier is Tier.DEVICE for view in self.views)

    def host_bytes(self, layer: int, names: tuple[str, ...]) -> int:
        total = 0
        for view in self.views:
            chunk_layer = view.chunk.layers[layer]
            if chunk_layer.tier is Tier.HOST:
                for name in names:
                    rows = chunk_layer.tensors[name][view.row_start : view.row_end]
                    total += rows.numel() * rows.element_size()
        return total

    def final_hidden(self) -> torch.Tensor:
        return self.views[-1].chunk.final_hidden

    def unusable_reason(self) -> str | None:
        """Why the replay cannot use these rows (then the sample is recomputed), or None."""
        if any(view.chunk.dropped for view in self.views):
            return "evicted"
        position = 0
        for view in self.views:
            if view.position_start != position:
                return "incomplete"
            position = view.position_end
        if position != self.num_tokens:
            return "incomplete"
        last = self.views[-1]
        if last.row_end != last.chunk.num_tokens or last.chunk.final_hidden is None:
            return "no_final_hidden"
        return None


@dataclass
class RequestRecording:
    rid: str
    prompt_ids: torch.Tensor  # int64 CPU
    adapter_version: int
    active: bool  # still recording (False: not chosen, or a gap made the record unusable)
    views: list[ChunkView] = field(default_factory=list)
    missing_reason: str | None = None  # why the record cannot be replayed
    started_at: float = field(default_factory=time.monotonic)

    @property
    def recorded_until(self) -> int:
        return self.views[-1].position_end if self.views else 0


@dataclass
class ServedSample:
    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    adapter_version: int
    finished_at: float
    activations: SampleActivations | None
    missing_reason: str | None  # why there are no usable activations ("not_recorded", ...)

    def replay_blocker(self) -> str | None:
        """Why this sample cannot be replayed now (it will be recomputed), or None."""
        if self.activations is None:
            return self.missing_reason or "not_recorded"
        return self.activations.unusable_reason()

    def public(self) -> dict:
        blocker = self.replay_blocker()
        return {
            "id": self.rid,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.output_ids),
            "adapter_version": self.adapter_version,
            "has_activations": blocker is None,
            "missing_reason": blocker,
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
        recording = RequestRecording(
            rid=rid,
            prompt_ids=torch.tensor(prompt_ids, dtype=torch.int64),
            adapter_version=adapter_version,
            active=record,
            missing_reason=None if record else (reason or "not_recorded"),
        )
        self.in_flight[rid] = recording
        return recording

    def set_views(self, recording: RequestRecording, views: list[ChunkView]) -> None:
        self.store.acquire(views)
        self.store.release(recording.views)
        recording.views = views

    def stop_recording(self, recording: RequestRecording, reason: str) -> None:
        recording.active = False
        recording.missing_reason = reason
        self.store.release(recording.views)
        recording.views = []

    # --- finished -------------------------------------------------------------------------

    def finish(self, rid: str, prompt_ids: list[int], output_ids: list[int], finish_reason: str,
               adapter_version: int, now: float | None = None) -> ServedSample:
        recording = self.in_flight.pop(rid, None)
        activations, missing = None, "not_recorded"
        if recording is not None:
            missing = recording.missing_reason
            if recording.views and missing is None:
                candidate = SampleActivations(self.store, recording.views, len(prompt_ids))
                missing = candidate.unusable_reason()
                if missing is None:
                    activations = candidate
            if activations is None:
                self.store.release(recording.views)
                recording.views = []
        sample = ServedSample(
            rid=rid, prompt_ids=list(prompt_ids), output_ids=list(output_ids), finish_reason=finish_reason,
            adapter_version=adapter_version, finished_at=time.monotonic() if now is None else now,
            activations=activations, missing_reason=None if activations else (missing or "not_recorded"),
        )
        self.served[rid] = sample
        while len(self.served) > self.max_served:
            self.release(next(iter(self.served)))
            self.expired += 1
        return sample

    def abort(self, rid: str) -> None:
        recording = self.in_flight.pop(rid, None)
        if recording is not None:
            self.store.release(recording.views)

    def get(self, rid: str) -> ServedSample | None:
        return self.served.get(rid)

    def take(self, rid: str) -> ServedSample | None:
        """Remove a sample for training; its activations stay referenced until ``release_sample``."""
        return self.served.pop(rid, None)

    def release_sample(self, sample: ServedSample) -> None:
        if sample.activations is not None:
            self.store.release(sample.activations.views)
            sample.activations = None

    def release(self, rid: str) -> None:
        sample = self.served.pop(rid, None)
        if sample is not None:
            self.release_sample(sample)

    def expire(self, now: float | None = None) -> int:
        """Release samples that waited longer than the feedback TTL; returns how many.

        Also forgets in-flight recordings older than twice the TTL: a request SGLang dropped
        without our seeing it finish must not hold recorded chunks forever.
        """
        now = time.monotonic() if now is None else now
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
        served = list(self.served.values())
        return {
            "in_flight": len(self.in_flight),
            "awaiting_feedback": len(served),
            "awaiting_feedback_with_activations": sum(1 for s in served if s.replay_blocker() is None),
            "expired": self.expired,
        }
