"""Recording around SGLang's prefill forward: plan the rows and their pages before it, commit after it.

``before_forward(requests)`` takes the requests of an extend (prefill) forward, as plain
:class:`ExtendRequest` values (``scheduler/sglang_view.py`` reads them off SGLang's batch): for
each request chosen by the recording policy it finds the prompt positions this forward computes
(``prefix_len .. prefix_len + extend_len``, cut at the prompt's end: in a retraction re-prefill
or a mixed batch, output positions are never recorded), their KV slots (``req_to_token``,
SGLang's position-to-slot table) and their rows in the batch's token dimension, reserves their
pages in the activation store and arms the capture hooks, which write the rows into those pages
during the forward.

A request whose prompt starts with a cached prefix (radix-cache hit, or the earlier pieces of
its own chunked prefill) reuses the rows recorded for that prefix's slots
(``ActivationStore.lookup_prefix``). Prefix rows that were never recorded - typically the
previous *response* of a conversation, which decode steps produced - or that belong to other
tokens are holes: the request keeps recording its new rows, and the trainer computes the holes.

``after_forward()`` commits the chunks (they become findable by slot) and adds them to their
requests' recordings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sglang_alchemist.memory.capture import CaptureSegment, PrefillCapture
from sglang_alchemist.memory.policy import RecordingPolicy
from sglang_alchemist.memory.samples import RequestRecording, SampleTable
from sglang_alchemist.memory.store import ActivationStore, ChunkView


@dataclass
class ExtendRequest:
    """One request of a prefill forward, as the recorder needs it (no SGLang types)."""

    rid: str
    prompt_ids: list[int]
    prefix_len: int  # positions already in the KV cache (prefix hit or earlier chunks)
    extend_len: int  # positions this forward computes (may run past the prompt: outputs)
    kv_row: int  # the request's row in req_to_token
    adapter_version: int  # -1: an adapter this server does not train
    custom_params: dict[str, Any] | None


@dataclass
class _Planned:
    recording: RequestRecording
    segment: CaptureSegment
    start: int  # prompt position of the first recorded row


@dataclass
class RecorderCounters:
    requests_recorded: int = 0
    requests_not_recorded: int = 0
    tokens_recorded: int = 0
    forwards_recorded: int = 0
    pieces_not_stored: int = 0  # no pages were free: those rows are holes
    incomplete_captures: int = 0  # a hook did not fire (e.g. a CUDA-graph replay): nothing stored


class PrefillRecorder:
    def __init__(self, model: torch.nn.Module, geometry, store: ActivationStore, samples: SampleTable,
                 policy: RecordingPolicy, req_to_token: torch.Tensor, dtype: torch.dtype) -> None:
        self.geometry = geometry
        self.store = store
        self.samples = samples
        self.policy = policy
        self.req_to_token = req_to_token
        self.capture = PrefillCapture(model, geometry.num_layers, store, geometry.q_size, geometry.kv_size)
        # every layer's keys and values, the adapted layers' other tensors (``store.layer_widths``)
        self.bytes_per_token = sum(sum(widths.values()) for widths in store.layer_widths) * store.element_size
        self.counters = RecorderCounters()
        self._planned: list[_Planned] = []
        # whether rows made with an adapter version could still be replayed (set by the runtime:
        # within --alchemist-max-staleness of the trainer's version); rows that never could are
        # not recorded - e.g. requests the adapter's scope left to the base model, many versions on
        self.replayable: Callable[[int], bool] | None = None

    def recording_for(self, request: ExtendRequest) -> RequestRecording:
        recording = self.samples.recording(request.rid)
        if recording is None:
            chosen = self.policy.should_record(request.rid, request.custom_params)
            reason = None if chosen else "not_recorded"
            if chosen and request.adapter_version < 0:
                chosen, reason = False, "foreign_adapter"
            elif chosen and self.replayable is not None and not self.replayable(request.adapter_version):
                chosen, reason = False, "stale"
            recording = self.samples.start(request.rid, request.prompt_ids, request.adapter_version, chosen, reason)
            if chosen:
                self.counters.requests_recorded += 1
            else:
                self.counters.requests_not_recorded += 1
        return recording

    def before_forward(self, requests: list[ExtendRequest]) -> bool:
        """Plan, reserve and arm the capture for an extend forward; False when nothing is recorded."""
        self._planned = []
        cursor = 0
        for request in requests:
            row_start, cursor = cursor, cursor + request.extend_len
            recording = self.recording_for(request)
            if not recording.active:
                continue
            prompt_len = len(recording.prompt_ids)
            if recording.covered_until < request.prefix_len:
                self._reuse_prefix(request, recording)
            start = max(request.prefix_len, recording.covered_until)
            end = min(request.prefix_len + request.extend_len, prompt_len)
            if end <= start:
                continue
            slots = self.req_to_token[request.kv_row, start:end].to("cpu", torch.int64)
            chunk = self.store.begin_chunk(recording.rid, start, recording.prompt_ids, slots,
                                           recording.adapter_version)
            recording.covered_until = end
            if chunk is None:
                recording.note_hole("no_room")
                self.counters.pieces_not_stored += 1
                continue
            segment = CaptureSegment(row=row_start + start - request.prefix_len, count=end - start, chunk=chunk)
            self._planned.append(_Planned(recording, segment, start))
        if not self._planned:
            return False
        self.capture.arm([planned.segment for planned in self._planned])
        return True

    def after_forward(self) -> None:
        segments, complete = self.capture.disarm()
        planned, self._planned = self._planned, []
        if not planned:
            return
        if not complete:
            self.counters.incomplete_captures += 1
            for item in planned:
                self.store.abort_chunk(item.segment.chunk)
                item.recording.note_hole("capture_incomplete")
            return
        self.counters.forwards_recorded += 1
        for item in planned:
            segment, recording = item.segment, item.recording
            ends_prompt = item.start + segment.count == len(recording.prompt_ids)
            final_hidden = segment.residual[-1:].clone() if ends_prompt else None
            self.store.commit_chunk(segment.chunk, final_hidden)
            self.samples.add_views(recording, [ChunkView(segment.chunk, 0, segment.count)])
            segment.residual = None
            self.counters.tokens_recorded += segment.count

    def abandon_forward(self) -> None:
        """The forward failed: give back the pages reserved for it."""
        self.capture.disarm()
        planned, self._planned = self._planned, []
        for item in planned:
            self.store.abort_chunk(item.segment.chunk)
            item.recording.note_hole("capture_incomplete")

    def _reuse_prefix(self, request: ExtendRequest, recording: RequestRecording) -> None:
        """Rows of positions [covered_until, prefix_len) recorded by earlier requests, holes elsewhere."""
        prefix_slots = self.req_to_token[request.kv_row, : request.prefix_len]
        views, reason = self.store.lookup_prefix(recording.prompt_ids, prefix_slots, recording.adapter_version)
        lower = recording.covered_until
        kept = []
        for view in views:
            if view.position_end <= lower:
                continue
            if view.position_start < lower:
                view = ChunkView(view.chunk, view.row_start + lower - view.position_start, view.row_end)
            kept.append(view)
        if reason is not None:
            recording.note_hole(reason)
        self.samples.add_views(recording, kept)
        recording.covered_until = request.prefix_len

    def status(self) -> dict:
        return dict(self.counters.__dict__)
