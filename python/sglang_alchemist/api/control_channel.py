"""HTTP-process end of the control channel to the scheduler process(es).

SGLang's own ``FanOutCommunicator`` serialises calls and matches replies by arrival order, so a
call abandoned after a timeout would hand its late reply to the next caller. Control calls
here (feedback, status, rollback…) may run concurrently and must time out cleanly when the
scheduler is busy or gone, so each call carries its own id (the ``rid`` field every SGLang IPC
struct has) and replies are matched by that id.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sglang.utils import TypeBasedDispatcher

from sglang_alchemist.ipc import EVENT_RID, AlchemistControlReq, AlchemistControlReqOutput


class SchedulerUnavailable(Exception):
    """The scheduler did not answer in time (it may be busy with a long batch, or down)."""


@dataclass
class _PendingCall:
    expected_replies: int
    future: asyncio.Future
    replies: list[AlchemistControlReqOutput] = field(default_factory=list)


class ControlChannel:
    def __init__(self, tokenizer_manager: Any, replies_per_call: int,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._tokenizer_manager = tokenizer_manager
        self._replies_per_call = replies_per_call
        self._on_event = on_event
        self._pending: dict[str, _PendingCall] = {}

    def handle_reply(self, reply: AlchemistControlReqOutput) -> None:
        if reply.rid == EVENT_RID:
            if self._on_event is not None:
                self._on_event(reply.payload)
            return
        pending = self._pending.get(reply.rid or "")
        if pending is None or pending.future.done():
            return  # the caller timed out and left
        pending.replies.append(reply)
        if len(pending.replies) >= pending.expected_replies:
            pending.future.set_result(pending.replies)

    async def call(
        self, op: str, payload: dict[str, Any] | None = None, timeout_s: float = 60.0
    ) -> list[AlchemistControlReqOutput]:
        """Send one operation to every scheduler (one per data-parallel rank); return all replies."""
        self._tokenizer_manager.auto_create_handle_loop()
        call_id = f"alchemist-{uuid.uuid4().hex}"
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = _PendingCall(self._replies_per_call, future)
        try:
            self._tokenizer_manager._dispatch_to_scheduler(
                AlchemistControlReq(rid=call_id, op=op, payload=payload or {})
            )
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise SchedulerUnavailable(
                f"the scheduler did not answer {op!r} within {timeout_s:.0f} s"
            ) from None
        finally:
            self._pending.pop(call_id, None)


def install_control_channel(tokenizer_manager: Any, on_event: Callable[[dict[str, Any]], None]) -> None:
    """Attach a :class:`ControlChannel` to SGLang's TokenizerManager and route replies to it.

    Registered as an AFTER hook on ``TokenizerControlMixin.init_communicators``, which runs in
    the TokenizerManager's constructor after its reply dispatcher exists.
    """
    from sglang.srt.runtime_context import get_parallel

    channel = ControlChannel(tokenizer_manager, get_parallel().num_dp_ranks, on_event)
    tokenizer_manager.alchemist_control = channel
    tokenizer_manager._result_dispatcher += TypeBasedDispatcher(
        [(AlchemistControlReqOutput, channel.handle_reply)]
    )
