"""Errors in the OpenAI API's format, so official clients raise their usual exception types."""

from __future__ import annotations

from fastapi.responses import ORJSONResponse

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
