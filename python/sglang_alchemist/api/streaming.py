"""Streaming chat/completion responses say which adapter version produced them.

SGLang 0.5.23 builds streaming responses in ``OpenAIServingChat._handle_streaming_request`` and
``OpenAIServingCompletion._handle_streaming_request``: each awaits its generator's first chunk
(by then the request has been routed to an adapter version, ``api/adapters.py``) and returns a
``StreamingResponse`` of ``data: {...}`` server-sent events. An AROUND hook on both
(``plugin.py``) passes the response through :func:`annotate_streaming_response`, which adds

- the response headers ``X-Alchemist-Adapter-Version: N`` (the version of the first choice) and
  ``X-Alchemist-Adapter-Applied: true|false`` (whether that version's adapter answered it, or its
  scope left it to the base model), and
- ``metadata.alchemist_adapter_version`` and ``metadata.alchemist_adapter_applied`` to every chunk
  that carries a ``finish_reason`` (the last content chunk of each choice), as non-streaming
  responses have them in ``metadata``.

No chunk is held back (the time to first token is unchanged): a chunk is parsed only when it
finishes a choice.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

ADAPTER_VERSION_HEADER = "X-Alchemist-Adapter-Version"
ADAPTER_APPLIED_HEADER = "X-Alchemist-Adapter-Applied"
_FINISHED = re.compile(r'"finish_reason":\s*"')
_PREFIX = "data: "


def _first_rid(adapted_request: Any) -> str | None:
    rid = getattr(adapted_request, "rid", None)
    if isinstance(rid, str):
        return rid
    if isinstance(rid, list) and rid and isinstance(rid[0], str):
        return rid[0]
    return None


def annotate_streaming_response(response: Any, router: Any, adapted_request: Any) -> Any:
    from starlette.responses import StreamingResponse

    if not isinstance(response, StreamingResponse):
        return response  # an error response: nothing was served
    rid = _first_rid(adapted_request)
    served = router.served(rid) if rid else None
    if served is not None:
        response.headers[ADAPTER_VERSION_HEADER] = str(served[0])
        response.headers[ADAPTER_APPLIED_HEADER] = "true" if served[1] else "false"
    response.body_iterator = _annotated(response.body_iterator, router)
    return response


async def _annotated(chunks: AsyncIterator[Any], router: Any) -> AsyncIterator[Any]:
    async for chunk in chunks:
        yield with_adapter_version(chunk, router.served)


def with_adapter_version(chunk: Any, served) -> Any:
    """``chunk`` with ``metadata.alchemist_adapter_version`` and ``..._applied`` if it finishes a choice.

    ``served(rid)``: (version, adapter applied) of the request, or None."""
    if not isinstance(chunk, str) or not chunk.startswith(_PREFIX + "{") or not _FINISHED.search(chunk):
        return chunk
    body = chunk[len(_PREFIX):]
    if body.rstrip("\n").count("\n"):
        return chunk  # not a single data line: leave it alone
    try:
        payload = json.loads(body)
    except ValueError:
        return chunk
    if not isinstance(payload, dict):
        return chunk
    rid = payload.get("id")
    routed = served(rid) if isinstance(rid, str) else None
    if routed is None:
        return chunk
    metadata = payload.get("metadata")
    payload["metadata"] = {**(metadata if isinstance(metadata, dict) else {}), "alchemist_adapter_version": routed[0],
                           "alchemist_adapter_applied": routed[1]}
    return _PREFIX + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"
