"""The one request/reply pair between the HTTP process and the scheduler process.

SGLang moves typed ``msgspec`` structs over ZMQ and dispatches them by type on both ends. All
of sglang_alchemist's control traffic (status, feedback, versions, pause, rollback) rides on a
single pair of types carrying an operation name and a JSON-compatible payload, so adding an
operation never touches SGLang's dispatch tables again.
"""

from __future__ import annotations

from typing import Any

import msgspec
from sglang.srt.managers.io_struct import BaseReq

# Replies with this rid are unsolicited events from the scheduler (e.g. a published version).
EVENT_RID = "alchemist-event"


class AlchemistControlReq(BaseReq, kw_only=True):
    op: str
    payload: dict[str, Any] = msgspec.field(default_factory=dict)


class AlchemistControlReqOutput(BaseReq, kw_only=True):
    ok: bool
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    error: str = ""
    # An HTTP status the route should answer with when ok is False (e.g. 404 unknown id).
    status_code: int = 500
