"""``POST /v1/feedback``: validate, journal durably, hand to the trainer.

Body, for a response this server served (``id`` is the completion's ``id``)::

    {"id": "<completion id>", "type": "accept" | "correction" | "reject",
     "completion": "<text, required for correction>", "weight": <optional number > 0>,
     "append_eos": <optional bool, correction only, default true>}

and for an exchange this server did not serve (always trained by recomputation)::

    {"messages": [...] | "prompt": "...", "completion": "...", "weight": ...}

What is trained (the *target*, after the served prompt's tokens):

- ``accept``: the served response's tokens, as generated (cross-entropy);
- ``correction``: the correction's tokens plus the end-of-turn token (cross-entropy);
- ``reject``: the served response's tokens with the unlikelihood objective, or nothing with
  ``--alchemist-reject-objective skip`` (journaled as dropped with that reason);
- external exchange: the chat template (``messages``, with the generation prompt) or the raw
  ``prompt``, then the completion plus the end-of-turn token (cross-entropy).

Order of work, so that nothing acknowledged can be lost: read the body (at most
``--alchemist-max-feedback-bytes``: a larger ``Content-Length`` is refused before any of the
body is read, a body without one is read incrementally and refused as soon as it passes the
limit) -> look up the served response in the scheduler (404 if unknown or expired) -> build the
token ids -> **commit the journal record** -> queue it in the scheduler -> 202. A second
feedback for the same ``id`` returns the first one's record if the body is identical
(idempotent retry) and 409 otherwise.

Concurrency: feedbacks for different ids run concurrently; those for one ``id`` are serialised
by a lock of that id only (dropped when no request holds or waits for it). The journal's
UNIQUE(completion_id) is the final arbiter: an insert refused by it (a concurrent duplicate
that got past the lock, e.g. from another process) is answered as a duplicate.

Text: every string in the body must be valid Unicode. JSON can spell a lone UTF-16 surrogate
(``"\ud800"``), which no tokenizer or UTF-8 encoder accepts: 400 naming the field
(``completion``, ``prompt``, ``messages[0].content``...). Control characters are text like any
other: escaped in JSON (``"\u0000"``, ``"\t"``, ``"\u001b"``) they are accepted and trained as
the tokenizer encodes them (code and terminal output contain them); unescaped inside a JSON
string they make the body invalid JSON (400), as the JSON grammar says.

Errors use the OpenAI error format: 400 malformed JSON (also: nested too deep, a number too
long to parse), missing or mistyped fields, invalid text, ``messages`` the chat template
refuses; 404 unknown or expired id; 409 a different feedback for an id that already has one;
413 a body larger than ``--alchemist-max-feedback-bytes``; 503 (with ``Retry-After``) when the
journal cannot store the feedback (disk full, read-only, locked by another process past its
busy timeout): nothing was stored, so nothing is acknowledged, serving goes on; 401 from
SGLang's ``--api-key`` check. Anything unexpected is a 500 in the same format (``routes.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import ORJSONResponse
from starlette.requests import ClientDisconnect

from sglang_alchemist.api.errors import openai_error
from sglang_alchemist.feedback.journal import FeedbackRecord, Journal, storage_failure

logger = logging.getLogger(__name__)

FEEDBACK_TYPES = ("accept", "correction", "reject")
ALLOWED_FIELDS = {"id", "type", "completion", "weight", "append_eos", "messages", "prompt"}
JOURNAL_RETRY_AFTER_S = 5


class FeedbackError(Exception):
    def __init__(self, status_code: int, message: str, param: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param
        self.retry_after_s = retry_after_s


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise FeedbackError(400, "the Content-Length header is not a byte count")
        if int(declared) > limit:
            raise FeedbackError(413, f"the body is {int(declared)} bytes; the limit is {limit} "
                                     f"(--alchemist-max-feedback-bytes)")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise FeedbackError(413, f"the body is over {limit} bytes, the limit "
                                         f"(--alchemist-max-feedback-bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise FeedbackError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_text(value: Any, param: str) -> None:
    """Refuse (400, naming the field) any string that is not valid Unicode (a lone surrogate).

    Iterative: JSON nested as deep as the parser allows must not exhaust the stack here.
    """
    pending = [(value, param)]
    while pending:
        value, param = pending.pop()
        if isinstance(value, str):
            _check_string(value, f"'{param}'", param)
        elif isinstance(value, list):
            pending.extend((item, f"{param}[{index}]") for index, item in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                _check_string(key, f"a key in '{param}'", param)
                pending.append((item, f"{param}.{key}"))


def _check_string(text: str, what: str, param: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise FeedbackError(
            400, f"{what} contains a lone UTF-16 surrogate ({text[error.start]!r} at character "
                 f"{error.start}), which is not valid Unicode text; send the character itself, or "
                 f"its complete surrogate pair", param,
        ) from None


class KeyedLocks:
    """One asyncio lock per key, dropped when no request holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


@dataclass
class ParsedFeedback:
    kind: str  # accept, correction, reject, external
    completion_id: str | None
    completion: str | None
    weight: float
    append_eos: bool
    messages: list[dict] | None
    prompt: str | None
    digest: str


def parse_feedback(body: bytes) -> ParsedFeedback:
    try:
        data = json.loads(body)
    except RecursionError:
        raise FeedbackError(400, "the body is not valid JSON: nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, a number too long to convert
        raise FeedbackError(400, f"the body is not valid JSON: {_printable(str(error))}") from None
    if not isinstance(data, dict):
        raise FeedbackError(400, "the body must be a JSON object")
    for key, value in data.items():
        _check_string(key, "a field name", None)
        check_text(value, key)
    unknown = sorted(set(data) - ALLOWED_FIELDS)
    if unknown:
        raise FeedbackError(400, f"unknown field(s): {', '.join(unknown)}", unknown[0])
    weight = data.get("weight", 1.0)
    try:
        valid_weight = (not isinstance(weight, bool) and isinstance(weight, int | float)
                        and math.isfinite(weight) and weight > 0)
    except OverflowError:  # an integer too large for a float
        valid_weight = False
    if not valid_weight:
        raise FeedbackError(400, "'weight' must be a number > 0", "weight")
    append_eos = data.get("append_eos", True)
    if not isinstance(append_eos, bool):
        raise FeedbackError(400, "'append_eos' must be true or false", "append_eos")
    completion = data.get("completion")
    if completion is not None and not isinstance(completion, str):
        raise FeedbackError(400, "'completion' must be a string", "completion")
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    if "id" in data:
        completion_id = data["id"]
        if not isinstance(completion_id, str) or not completion_id:
            raise FeedbackError(400, "'id' must be the non-empty id of a completion", "id")
        if "messages" in data or "prompt" in data:
            raise FeedbackError(400, "give either 'id' (a served response) or 'messages'/'prompt', not both")
        kind = data.get("type")
        if kind not in FEEDBACK_TYPES:
            raise FeedbackError(400, f"'type' must be one of {', '.join(FEEDBACK_TYPES)}", "type")
        if kind == "correction" and not completion:
            raise FeedbackError(400, "a correction needs a non-empty 'completion'", "completion")
        if kind != "correction" and completion is not None:
            raise FeedbackError(400, f"'completion' is only for corrections, not '{kind}'", "completion")
        return ParsedFeedback(kind, completion_id, completion, float(weight), append_eos, None, None, digest)

    messages, prompt = data.get("messages"), data.get("prompt")
    if (messages is None) == (prompt is None):
        raise FeedbackError(400, "give 'id' for a served response, or exactly one of 'messages' and 'prompt'")
    if "type" in data and data["type"] != "correction":
        raise FeedbackError(400, "an exchange this server did not serve can only be trained as its completion",
                            "type")
    if not completion:
        raise FeedbackError(400, "an exchange needs a non-empty 'completion'", "completion")
    if messages is not None and not (
        isinstance(messages, list) and messages
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)
    ):
        raise FeedbackError(400, "'messages' must be a non-empty list of {role, content} strings", "messages")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise FeedbackError(400, "'prompt' must be a non-empty string", "prompt")
    return ParsedFeedback("external", None, completion, float(weight), True, messages, prompt, digest)


class FeedbackService:
    """The route's work, given the tokenizer, the journal and a way to call the scheduler."""

    def __init__(self, journal: Journal, config, call_schedulers, served_by=None) -> None:
        self.journal = journal
        self.config = config
        self.call_schedulers = call_schedulers
        # rid -> (served version, whether its adapter answered) as the router decided it for the
        # response (``AdapterRouter.served``); None when unknown (e.g. served before a restart)
        self.served_by = served_by
        self._locks = KeyedLocks()  # per completion id: its check -> insert -> enqueue sequence

    async def handle(self, request: Request, tokenizer) -> ORJSONResponse | dict:
        feedback = parse_feedback(await read_body(request, self.config.max_feedback_bytes))
        if feedback.completion_id is None:
            prompt_ids, target_ids = self._external_ids(feedback, tokenizer)
            record = self._new_record(feedback, prompt_ids, target_ids, "sft", None)
            await self._journal(self.journal.insert, record)  # committed before we answer
            return self._reply(record, await self._enqueue(record))
        async with self._locks.hold(feedback.completion_id):
            existing = await self._journal(self.journal.by_completion, feedback.completion_id)
            if existing is not None:
                return await self._duplicate(feedback, existing)
            served = await self._scheduler("lookup", {"id": feedback.completion_id})
            target_ids, objective = self._served_target(feedback, served, tokenizer)
            version, applied = self._served_as(feedback.completion_id, served["adapter_version"])
            record = self._new_record(feedback, served["prompt_ids"], target_ids, objective, version, applied)
            try:
                await self._journal(self.journal.insert, record)  # committed before we answer
            except sqlite3.IntegrityError:
                # UNIQUE(completion_id): a concurrent feedback for this id was committed first.
                existing = await self._journal(self.journal.by_completion, feedback.completion_id)
                if existing is None:
                    raise
                return await self._duplicate(feedback, existing)
            if objective == "none":
                await self._scheduler("drop", {"completion_id": feedback.completion_id})
                return self._reply(record, None)
            return self._reply(record, await self._enqueue(record))

    def _served_as(self, completion_id: str, scheduler_version: int) -> tuple[int, bool]:
        """The version a response was served by and whether its adapter answered, as its response said.

        The scheduler knows only which weights ran (0 when the scope left the request to the base
        model); the router's record is the response's own story. A response from before a restart
        is known to the scheduler alone: its adapter answered if a version > 0 ran.
        """
        routed = self.served_by(completion_id) if self.served_by is not None else None
        if routed is not None:
            return routed
        return scheduler_version, scheduler_version != 0

    @staticmethod
    def _new_record(feedback: ParsedFeedback, prompt_ids: list[int], target_ids: list[int], objective: str,
                    served_version: int | None, adapter_applied: bool | None = None) -> FeedbackRecord:
        return FeedbackRecord(
            feedback_id=f"fb-{uuid.uuid4().hex}", completion_id=feedback.completion_id, kind=feedback.kind,
            objective=objective, weight=feedback.weight, request_digest=feedback.digest,
            prompt_ids=list(prompt_ids), target_ids=list(target_ids), served_version=served_version,
            adapter_applied=adapter_applied,
            state="dropped" if objective == "none" else "queued",
            reason="reject_not_trained" if objective == "none" else None,
        )

    async def _duplicate(self, feedback: ParsedFeedback, existing: FeedbackRecord) -> dict:
        if existing.request_digest != feedback.digest:
            raise FeedbackError(409, f"completion {feedback.completion_id!r} already has a different "
                                     f"feedback ({existing.feedback_id}); feedback cannot be changed", "id")
        queued = None
        if existing.state == "queued":  # the first attempt may not have reached the trainer
            queued = await self._enqueue(existing)
        return {**self._reply(existing, queued), "duplicate": True}

    async def _journal(self, operation: Callable, *args: Any) -> Any:
        """Run a journal operation off the event loop; its storage failing is a 503, not a 500."""
        try:
            return await asyncio.to_thread(operation, *args)
        except sqlite3.IntegrityError:
            raise
        except Exception as error:
            reason = storage_failure(error)
            if reason is None:
                raise
            writing = operation.__name__ == "insert"
            logger.warning("sglang_alchemist: the feedback journal %s failed (%s): %s; answered 503",
                           self.journal.path, operation.__name__, reason)
            raise FeedbackError(
                503,
                f"the feedback journal could not {'store' if writing else 'be read for'} this "
                f"feedback: {reason}. Nothing was stored "
                f"and nothing will be trained from this request; serving goes on. Retry later "
                f"(resending the same body is safe).",
                retry_after_s=JOURNAL_RETRY_AFTER_S,
            ) from None

    async def _enqueue(self, record: FeedbackRecord) -> dict[str, Any]:
        """Queue a journaled record in the trainer (a record it already knows is ignored there)."""
        return await self._scheduler("enqueue", {
            "feedback_id": record.feedback_id, "completion_id": record.completion_id,
            "prompt_ids": record.prompt_ids, "target_ids": record.target_ids,
            "objective": record.objective, "weight": record.weight, "kind": record.kind,
        })

    async def _scheduler(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        replies = await self.call_schedulers(op, payload)
        if isinstance(replies, ORJSONResponse):
            raise _ForwardedError(replies)
        return replies[0]

    def _served_target(self, feedback: ParsedFeedback, served: dict, tokenizer) -> tuple[list[int], str]:
        if feedback.kind == "correction":
            target = tokenizer.encode(feedback.completion, add_special_tokens=False)
            if feedback.append_eos and tokenizer.eos_token_id is not None:
                target.append(tokenizer.eos_token_id)
            return target, "sft"
        output = list(served["output_ids"])
        if not output:
            raise FeedbackError(400, "the served response has no tokens to train on", "id")
        if feedback.kind == "accept":
            return output, "sft"
        return output, ("none" if self.config.reject_objective == "skip" else "unlikelihood")

    @staticmethod
    def _external_ids(feedback: ParsedFeedback, tokenizer) -> tuple[list[int], list[int]]:
        if feedback.messages is not None:
            try:
                prompt_ids = tokenizer.apply_chat_template(
                    feedback.messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            except Exception as error:  # the template's own checks (roles, order...) raise
                raise FeedbackError(400, f"'messages' cannot be formatted with the model's chat template: "
                                         f"{type(error).__name__}: {_printable(str(error))}", "messages") from None
        else:
            prompt_ids = tokenizer.encode(feedback.prompt)
        target = tokenizer.encode(feedback.completion, add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            target.append(tokenizer.eos_token_id)
        return list(prompt_ids), target

    @staticmethod
    def _reply(record: FeedbackRecord, queued: dict | None) -> dict:
        return {
            "object": "alchemist.feedback",
            **record.public(),
            "activations_reusable": bool(queued and queued.get("activations_reusable")),
            "replay_blocker": None if queued is None else queued.get("replay_blocker"),
        }


class _ForwardedError(Exception):
    """A scheduler error reply, already in the OpenAI format, to return as is."""

    def __init__(self, response: ORJSONResponse) -> None:
        super().__init__("scheduler error")
        self.response = response


async def feedback_route(request: Request, service: FeedbackService, tokenizer) -> ORJSONResponse:
    try:
        result = await service.handle(request, tokenizer)
    except FeedbackError as error:
        response = openai_error(error.status_code, str(error), error.param)
        if error.retry_after_s is not None:
            response.headers["Retry-After"] = str(error.retry_after_s)
        return response
    except _ForwardedError as error:
        return error.response
    if isinstance(result, ORJSONResponse):
        return result
    return ORJSONResponse(status_code=202, content=result)
