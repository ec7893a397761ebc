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

Order of work, so that nothing acknowledged can be lost: look up the served response in the
scheduler (404 if unknown or expired) -> build the token ids -> **commit the journal record**
-> queue it in the scheduler -> 202. A second feedback for the same ``id`` returns the first
one's record if the body is identical (idempotent retry) and 409 otherwise.

Errors use the OpenAI error format: 400 malformed JSON, missing or mistyped fields; 404 unknown
or expired id; 409 a different feedback for an id that already has one; 413 a body larger than
``--alchemist-max-feedback-bytes``; 401 from SGLang's ``--api-key`` check.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import ORJSONResponse

from sglang_alchemist.api.errors import openai_error
from sglang_alchemist.feedback.journal import FeedbackRecord, Journal

FEEDBACK_TYPES = ("accept", "correction", "reject")
ALLOWED_FIELDS = {"id", "type", "completion", "weight", "append_eos", "messages", "prompt"}


class FeedbackError(Exception):
    def __init__(self, status_code: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param


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
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FeedbackError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise FeedbackError(400, "the body must be a JSON object")
    unknown = sorted(set(data) - ALLOWED_FIELDS)
    if unknown:
        raise FeedbackError(400, f"unknown field(s): {', '.join(unknown)}", unknown[0])
    weight = data.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
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

    def __init__(self, journal: Journal, config, call_schedulers) -> None:
        self.journal = journal
        self.config = config
        self.call_schedulers = call_schedulers
        self._lock = asyncio.Lock()  # one feedback at a time per id check -> insert sequence

    async def handle(self, request: Request, tokenizer) -> ORJSONResponse | dict:
        body = await request.body()
        if len(body) > self.config.max_feedback_bytes:
            raise FeedbackError(413, f"the body is {len(body)} bytes; the limit is "
                                     f"{self.config.max_feedback_bytes} (--alchemist-max-feedback-bytes)")
        feedback = parse_feedback(body)
        async with self._lock:
            if feedback.completion_id is not None:
                existing = await asyncio.to_thread(self.journal.by_completion, feedback.completion_id)
                if existing is not None:
                    if existing.request_digest != feedback.digest:
                        raise FeedbackError(409, f"completion {feedback.completion_id!r} already has a different "
                                                 f"feedback ({existing.feedback_id}); feedback cannot be changed",
                                            "id")
                    queued = None
                    if existing.state == "queued":  # the first attempt may not have reached the trainer
                        queued = await self._enqueue(existing)
                    return {**self._reply(existing, queued), "duplicate": True}
                served = await self._scheduler("lookup", {"id": feedback.completion_id})
                prompt_ids = served["prompt_ids"]
                target_ids, objective = self._served_target(feedback, served, tokenizer)
                served_version = served["adapter_version"]
            else:
                prompt_ids, target_ids = self._external_ids(feedback, tokenizer)
                objective, served_version = "sft", None
            record = FeedbackRecord(
                feedback_id=f"fb-{uuid.uuid4().hex}", completion_id=feedback.completion_id, kind=feedback.kind,
                objective=objective, weight=feedback.weight, request_digest=feedback.digest,
                prompt_ids=prompt_ids, target_ids=target_ids, served_version=served_version,
                state="dropped" if objective == "none" else "queued",
                reason="reject_not_trained" if objective == "none" else None,
            )
            await asyncio.to_thread(self.journal.insert, record)  # committed before we answer
        if objective == "none":
            await self._scheduler("drop", {"completion_id": feedback.completion_id})
            return self._reply(record, None)
        return self._reply(record, await self._enqueue(record))

    async def _enqueue(self, record: FeedbackRecord) -> dict[str, Any]:
        """Queue a journaled record in the trainer (a record it already knows is ignored there)."""
        return await self._scheduler("enqueue", {
            "feedback_id": record.feedback_id, "completion_id": record.completion_id,
            "prompt_ids": record.prompt_ids, "target_ids": record.target_ids,
            "objective": record.objective, "weight": record.weight,
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
            prompt_ids = tokenizer.apply_chat_template(
                feedback.messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
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
        return openai_error(error.status_code, str(error), error.param)
    except _ForwardedError as error:
        return error.response
    if isinstance(result, ORJSONResponse):
        return result
    return ORJSONResponse(status_code=202, content=result)
