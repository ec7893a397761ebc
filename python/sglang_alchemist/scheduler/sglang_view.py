"""The one place the scheduler side reads SGLang's internals: batches, requests, the model runner.

Everything else in the scheduler process works on the plain values returned here, so an SGLang
upgrade that renames an attribute touches this file (and ``memory/capture.py`` for module
names, ``training/sglang_weights.py`` for weight layouts), nothing else. Checked against
SGLang 0.5.23 (see docs/NOTES.md for where it differs from the design notes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sglang_alchemist.memory.recorder import ExtendRequest
from sglang_alchemist.training.versions import ADAPTER_NAME_PREFIX


def adapter_version_from_name(name: str | None) -> int:
    """0 for the base model, N for our adapter ``alchemist-vN``, -1 for any other adapter."""
    if name is None:
        return 0
    if name.startswith(ADAPTER_NAME_PREFIX) and name[len(ADAPTER_NAME_PREFIX):].isdigit():
        return int(name[len(ADAPTER_NAME_PREFIX):])
    return -1


@dataclass
class FinishedRequest:
    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_type: str  # "stop", "length", "abort", ...
    adapter_version: int


@dataclass
class RunnerView:
    """What the runtime needs from SGLang's model runner and scheduler at start-up."""

    model: torch.nn.Module
    hf_config: Any
    model_path: str
    trust_remote_code: bool
    context_len: int
    kv_slots: int
    req_to_token: torch.Tensor
    device: torch.device
    tokenizer: Any


def runner_view(scheduler) -> RunnerView:
    runner = scheduler.tp_worker.model_runner
    model_config = runner.model_config
    page_size = int(getattr(runner, "page_size", 1) or 1)
    return RunnerView(
        model=runner.model, hf_config=model_config.hf_config, model_path=model_config.model_path,
        trust_remote_code=bool(getattr(model_config, "trust_remote_code", False)),
        context_len=int(model_config.context_len),
        kv_slots=int(runner.token_to_kv_pool.size) + page_size + 1,
        req_to_token=scheduler.req_to_token_pool.req_to_token, device=torch.device(scheduler.device),
        tokenizer=getattr(scheduler, "tokenizer", None),
    )


class AdapterVersions:
    """SGLang's LoRA ids -> our adapter versions (a request carries the id of its adapter)."""

    def __init__(self, scheduler) -> None:
        self._runner = scheduler.tp_worker.model_runner

    def __call__(self, lora_id: str | None) -> int:
        if lora_id is None:
            return 0
        manager = getattr(self._runner, "lora_manager", None)
        refs = getattr(manager, "lora_refs", {}) if manager is not None else {}
        ref = refs.get(lora_id)
        return -1 if ref is None else adapter_version_from_name(ref.lora_name)


def is_extend(batch) -> bool:
    return batch.forward_mode.is_extend()


def is_decode(batch) -> bool:
    return batch.forward_mode.is_decode()


def extend_requests(batch, version_of) -> list[ExtendRequest]:
    return [
        ExtendRequest(
            rid=req.rid, prompt_ids=req.origin_input_ids, prefix_len=int(batch.prefix_lens[index]),
            extend_len=int(batch.extend_lens[index]), kv_row=int(req.kv.req_pool_idx),
            adapter_version=version_of(req.lora_id),
            custom_params=getattr(req.sampling_params, "custom_params", None),
        )
        for index, req in enumerate(batch.reqs)
    ]


_FINISHED_MARK = "_alchemist_finished"


def newly_finished(batch, version_of) -> list[FinishedRequest]:
    """Requests of this batch that finished and were not reported yet (each Req object once).

    Marked on the Req object itself rather than looked up by request id: a client may reuse an
    id for a later request, which must be reported (and replace the earlier sample) too.
    """
    finished = []
    for req in batch.reqs:
        if not req.finished() or getattr(req, _FINISHED_MARK, False):
            continue
        setattr(req, _FINISHED_MARK, True)
        reason = req.finished_reason.to_json() if req.finished_reason is not None else {"type": "unknown"}
        finished.append(FinishedRequest(req.rid, list(req.origin_input_ids), list(req.output_ids),
                                        reason.get("type", "stop"), version_of(req.lora_id)))
    return finished


def first_token_waits(batch, now: float) -> list[tuple[str, float]]:
    """(rid, seconds since it entered the waiting queue) for requests whose first token this batch made."""
    waits = []
    for req in batch.reqs:
        if len(req.output_ids) != 1:  # a chunk before the last, or a retracted request's re-prefill
            continue
        queued_at = getattr(getattr(req, "time_stats", None), "wait_queue_entry_time", 0.0)
        if queued_at > 0.0:
            waits.append((req.rid, now - queued_at))
    return waits


def queue_lengths(scheduler) -> tuple[int, int]:
    """(running, waiting) requests of SGLang's scheduler."""
    return len(scheduler.running_batch.reqs), len(scheduler.waiting_queue)


class EventSender:
    """Unsolicited events to the HTTP process, from any thread: a ZMQ socket of its own.

    SGLang's own socket to the tokenizer belongs to the scheduler loop's thread (ZMQ sockets are
    not thread-safe), and that loop may be asleep (``--sleep-on-idle``) when the publisher finishes
    a version; a second PUSH socket to the same endpoint delivers at once.
    """

    def __init__(self, port_args) -> None:
        self._endpoint = port_args.tokenizer_ipc_name
        self._socket = None

    def send(self, output) -> None:
        import zmq
        from sglang.srt.managers.io_struct import sock_send
        from sglang.srt.utils.network import get_zmq_socket

        if self._socket is None:
            self._socket = get_zmq_socket(zmq.Context(1), zmq.PUSH, self._endpoint, False)
        sock_send(self._socket, output)
