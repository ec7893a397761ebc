"""Recording around SGLang's prefill forward: plan the rows before it, store the chunks after it.

``before_forward(batch)`` reads SGLang's ``ScheduleBatch`` for an extend (prefill) forward:
for each request chosen by the recording policy it finds the prompt positions this forward
computes (``prefix_len .. prefix_len + extend_len``, cut at the prompt's end: in a retraction
re-prefill or a mixed batch, output positions are never recorded), their KV slots
(``req_to_token``, SGLang's position-to-slot table) and their rows in the batch's token
dimension, and arms the capture hooks with those rows.

A request whose prompt starts with a cached prefix (radix-cache hit, or the earlier pieces of
its own chunked prefill) reuses the rows recorded for that prefix's slots
(``ActivationStore.lookup_prefix``); if any prefix row is missing or belongs to other tokens,
the request stops recording and its sample will be recomputed.

``after_forward()`` splits the captured rows per request into chunks and admits them into the
activation store (which may move or drop older chunks to keep its budgets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_alchemist.memory.capture import CapturePlan, PrefillCapture
from sglang_alchemist.memory.policy import RecordingPolicy
from sglang_alchemist.memory.records import LAYER_TENSORS, bytes_per_token_per_layer
from sglang_alchemist.memory.samples import RequestRecording, SampleTable
from sglang_alchemist.memory.store import ActivationStore, ChunkView


@dataclass
class _Segment:
    recording: RequestRecording
    start: int  # prompt position of the first recorded row
    count: int
    batch_row: int  # first row among this forward's recorded rows
    slots: torch.Tensor


@dataclass
class RecorderCounters:
    requests_recorded: int = 0
    requests_not_recorded: int = 0
    tokens_recorded: int = 0
    forwards_recorded: int = 0
    incomplete_captures: int = 0  # a hook did not fire (e.g. a CUDA-graph replay): nothing stored


class PrefillRecorder:
    def __init__(self, model: torch.nn.Module, geometry, store: ActivationStore, samples: SampleTable,
                 policy: RecordingPolicy, req_to_token: torch.Tensor, version_of, dtype: torch.dtype) -> None:
        self.geometry = geometry
        self.store = store
        self.samples = samples
        self.policy = policy
        self.req_to_token = req_to_token
        self.version_of = version_of  # lora_id -> adapter version (-1: an adapter we do not train)
        self.capture = PrefillCapture(model, geometry.num_layers)
        self.bytes_per_token = bytes_per_token_per_layer(geometry, dtype) * geometry.num_layers
        self.counters = RecorderCounters()
        self._segments: list[_Segment] = []

    def recording_for(self, req) -> RequestRecording:
        recording = self.samples.recording(req.rid)
        if recording is None:
            version = self.version_of(req.lora_id)
            custom = getattr(req.sampling_params, "custom_params", None)
            chosen = self.policy.should_record(req.rid, custom)
            reason = None if chosen else "not_recorded"
            if chosen and version < 0:
                chosen, reason = False, "foreign_adapter"
            recording = self.samples.start(req.rid, list(req.origin_input_ids), version, chosen, reason)
            if chosen:
                self.counters.requests_recorded += 1
            else:
                self.counters.requests_not_recorded += 1
        return recording

    def before_forward(self, batch) -> bool:
        """Plan and arm the capture for an extend batch; False when nothing is recorded."""
        self._segments = []
        rows: list[torch.Tensor] = []
        cursor = recorded_rows = 0
        for index, req in enumerate(batch.reqs):
            prefix_len, extend_len = int(batch.prefix_lens[index]), int(batch.extend_lens[index])
            row_start, cursor = cursor, cursor + extend_len
            recording = self.recording_for(req)
            end = min(prefix_len + extend_len, len(recording.prompt_ids))
            if not recording.active or end <= prefix_len:
                continue
            if recording.recorded_until != prefix_len and not self._reuse_prefix(req, recording, prefix_len):
                continue
            count = end - prefix_len
            slots = self.req_to_token[req.kv.req_pool_idx, prefix_len:end].to("cpu", torch.int64)
            self._segments.append(_Segment(recording, prefix_len, count, recorded_rows, slots))
            rows.append(torch.arange(row_start, row_start + count))
            recorded_rows += count
        if not self._segments:
            return False
        self.store.reserve(recorded_rows * self.bytes_per_token)
        plan = CapturePlan(
            rows=torch.cat(rows).to(self.req_to_token.device),
            q_size=self.geometry.q_size,
            kv_size=self.geometry.kv_size,
        )
        self.capture.arm(plan, self.geometry.num_layers)
        return True

    def after_forward(self) -> None:
        captured = self.capture.disarm()
        segments, self._segments = self._segments, []
        if captured is None or not segments:
            return
        if captured.final_residual is None or any(len(layer) != len(LAYER_TENSORS) for layer in captured.layers):
            self.counters.incomplete_captures += 1
            for segment in segments:
                self.samples.stop_recording(segment.recording, "capture_incomplete")
            return
        self.counters.forwards_recorded += 1
        shared = len(segments) > 1  # rows of several requests share one tensor: copy each out
        for segment in segments:
            recording = segment.recording
            first, last = segment.batch_row, segment.batch_row + segment.count
            layers = [
                {name: _take(layer[name], first, last, shared) for name in LAYER_TENSORS}
                for layer in captured.layers
            ]
            ends_prompt = segment.start + segment.count == len(recording.prompt_ids)
            final_hidden = _take(captured.final_residual, last - 1, last, True) if ends_prompt else None
            chunk = self.store.add_chunk(
                owner=recording.rid, start=segment.start, prompt_ids=recording.prompt_ids, slots=segment.slots,
                adapter_version=recording.adapter_version, layer_tensors=layers, final_hidden=final_hidden,
            )
            if chunk is None:
                self.samples.stop_recording(recording, "no_room")
                continue
            self.samples.set_views(recording, [*recording.views, ChunkView(chunk, 0, segment.count)])
            self.counters.tokens_recorded += segment.count

    def _reuse_prefix(self, req, recording: RequestRecording, prefix_len: int) -> bool:
        prefix_slots = self.req_to_token[req.kv.req_pool_idx, :prefix_len]
        views, reason = self.store.lookup_prefix(recording.prompt_ids, prefix_slots, recording.adapter_version)
        if views is None:
            self.samples.stop_recording(recording, reason)
            return False
        self.samples.set_views(recording, views)
        return True

    def status(self) -> dict:
        return dict(self.counters.__dict__)


def _take(tensor: torch.Tensor, first: int, last: int, copy: bool) -> torch.Tensor:
    rows = tensor[first:last]
    return rows.clone() if copy else rows
