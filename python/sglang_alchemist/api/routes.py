"""Routes sglang_alchemist adds to SGLang's own FastAPI app (same port, same process).

Handlers are thin: they validate HTTP input, call the scheduler over the control channel and
shape the reply. Anything that needs the model or the trainer happens in the scheduler process.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import ORJSONResponse

from sglang_alchemist import __version__
from sglang_alchemist.api.control_channel import SchedulerUnavailable
from sglang_alchemist.api.errors import openai_error
from sglang_alchemist.config import AlchemistConfig

logger = logging.getLogger(__name__)


def _tokenizer_manager() -> Any:
    from sglang.srt.entrypoints.http_server import get_global_state

    return get_global_state().tokenizer_manager


async def call_schedulers(op: str, payload: dict[str, Any] | None = None) -> list[dict[str, Any]] | ORJSONResponse:
    """Run a control operation on every scheduler; an error reply becomes an OpenAI-format error."""
    channel = getattr(_tokenizer_manager(), "alchemist_control", None)
    if channel is None:
        return openai_error(503, "sglang_alchemist's control channel is not installed")
    try:
        replies = await channel.call(op, payload)
    except SchedulerUnavailable as error:
        return openai_error(503, str(error))
    for reply in replies:
        if not reply.ok:
            return openai_error(reply.status_code, reply.error)
    return [reply.payload for reply in replies]


def register_routes(app: FastAPI, config: AlchemistConfig) -> None:
    import sglang

    @app.get("/v1/alchemist/status")
    async def alchemist_status(request: Request):
        schedulers = await call_schedulers("status")
        if isinstance(schedulers, ORJSONResponse):
            return schedulers
        tokenizer_manager = _tokenizer_manager()
        return {
            "object": "alchemist.status",
            "sglang_alchemist_version": __version__,
            "sglang_version": sglang.__version__,
            "served_model_name": tokenizer_manager.served_model_name,
            "http_process": {"config": config.public_dict()},
            "schedulers": schedulers,
        }

    if config.debug_endpoints:

        @app.get("/v1/alchemist/debug/record/{completion_id}")
        async def alchemist_debug_record(completion_id: str):
            """Dump a served response's recorded tensors to a file on the server (tests only)."""
            replies = await call_schedulers("debug_record", {"id": completion_id})
            return replies if isinstance(replies, ORJSONResponse) else replies[0]
