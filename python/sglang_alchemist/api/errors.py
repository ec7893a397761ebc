"""Errors in the OpenAI API's format, so official clients raise their usual exception types."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import ORJSONResponse

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
}


def openai_error(status_code: int, message: str, param: str | None = None) -> ORJSONResponse:
    return ORJSONResponse(
        status_code=status_code,
        content={
            "error": {
                "message": message,
                "type": _ERROR_TYPES.get(status_code, "server_error"),
                "param": param,
                "code": status_code,
            }
        },
    )


def internal_error(error: BaseException, where: str) -> ORJSONResponse:
    """A 500 in the OpenAI format for an unexpected exception, logged with its traceback.

    The reply names the exception type and a reference to find the traceback in the server
    log, never the exception's text (it may hold paths or data of other requests).
    """
    reference = uuid.uuid4().hex[:12]
    logger.error("sglang_alchemist: unexpected error in %s (reference %s)", where, reference, exc_info=error)
    return openai_error(500, f"internal error in sglang_alchemist while handling {where} "
                             f"({type(error).__name__}); reference {reference} in the server log")


def guarded(where: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Decorate a route handler: any unexpected exception becomes :func:`internal_error`.

    ``functools.wraps`` keeps the handler's signature, which FastAPI reads for its parameters.
    """

    def decorate(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(handler)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await handler(*args, **kwargs)
            except Exception as error:  # asyncio.CancelledError (a client gone) is not caught
                return internal_error(error, where)

        return wrapper

    return decorate
