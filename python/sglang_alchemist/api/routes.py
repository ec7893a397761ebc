"""Routes sglang_alchemist adds to SGLang's own FastAPI app (same port, same process).

| route | auth | what |
| --- | --- | --- |
| ``POST /v1/feedback`` | SGLang ``--api-key`` | accept / correct / reject a response (``api/feedback.py``) |
| ``GET /v1/alchemist/status`` | admin | versions, config, recording, store, training, SLO, journal |
| ``GET /v1/alchemist/versions`` | admin | adapter versions, lineage, which one is served |
| ``POST /v1/alchemist/rollback`` | admin | ``{"version": N}``: serve and train from version N again |
| ``POST /v1/alchemist/pause``, ``/resume`` | admin | stop / restart training (serving goes on) |
| ``POST /v1/alchemist/slo`` | admin | change ``tpot_slo_ms``, ``ttft_slo_ms``, ``train_share`` at run time |
| ``POST /v1/alchemist/recording`` | admin | change the recording ``policy`` (and ``sample_rate``) at run time |
| ``GET /v1/alchemist/completions/{id}`` | admin | which adapter version produced a response |
| ``GET /v1/alchemist/metrics`` | admin | Prometheus text format |
| ``/v1/alchemist/debug/*`` | admin | only with ``--alchemist-debug-endpoints`` (tests) |

Admin routes need the admin key when one is set (``--alchemist-admin-key``, its file or
``SGLANG_ALCHEMIST_ADMIN_KEY``: ``admin_key.py``), as ``Authorization: Bearer <key>`` or, when
SGLang's ``--api-key`` already occupies that header, ``X-Alchemist-Admin-Key: <key>``; keys are
compared as UTF-8 bytes in constant time (any header value gets a 401, never a 500).
Handlers are thin: validate HTTP input, call the scheduler over the control channel, shape
the reply. Anything that needs the model or the trainer happens in the scheduler process.
Every handler is :func:`~sglang_alchemist.api.errors.guarded`: an unexpected exception is
logged with its traceback and answered with a 500 in the OpenAI error format.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import ORJSONResponse, PlainTextResponse

from sglang_alchemist import __version__
from sglang_alchemist.api.adapters import AdapterRouter
from sglang_alchemist.api.control_channel import SchedulerUnavailable
from sglang_alchemist.api.errors import guarded, openai_error
from sglang_alchemist.api.feedback import FeedbackService, feedback_route
from sglang_alchemist.api.metrics import (
    REFRESH_INTERVAL_S,
    LiveMetrics,
    install_on_sglang_metrics,
    prometheus_text,
)
from sglang_alchemist.config import AlchemistConfig
from sglang_alchemist.feedback.journal import Journal, journal_path
from sglang_alchemist.feedback.meaning import background as meaning_background
from sglang_alchemist.feedback.meaning import shared_encoder
from sglang_alchemist.feedback.scope import Learnt, Scope, chat_text, template_words

logger = logging.getLogger(__name__)

ADMIN_HEADER = "x-alchemist-admin-key"
INTERNAL_HEADER = "x-alchemist-internal-token"


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


def _same_key(offered: str, key: str) -> bool:
    """Constant-time comparison of a header value with a key, as bytes.

    ``compare_digest`` on str raises TypeError for non-ASCII text (a 500 for any client sending
    such a header). Starlette decodes header values as latin-1, so ``encode("latin-1")`` gives back
    the bytes the client sent; the key is compared as UTF-8, so a non-ASCII key works when a
    client sends it UTF-8 encoded.
    """
    try:
        offered_bytes = offered.encode("latin-1")
    except UnicodeEncodeError:  # not from a header
        offered_bytes = offered.encode("utf-8", "surrogatepass")
    return secrets.compare_digest(offered_bytes, key.encode("utf-8", "surrogatepass"))


class _Routes:
    """``app.get`` / ``app.post`` whose handlers are :func:`guarded` (an OpenAI-format 500)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def get(self, path: str):
        return lambda handler: self.app.get(path)(guarded(f"GET {path}")(handler))

    def post(self, path: str):
        return lambda handler: self.app.post(path)(guarded(f"POST {path}")(handler))


async def _json_object(request: Request) -> dict | ORJSONResponse:
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, numbers too long
        return openai_error(400, "the body must be a JSON object")
    return body if isinstance(body, dict) else openai_error(400, "the body must be a JSON object")


class AlchemistApi:
    """State of the HTTP process: config, journal, adapter routing; installs the routes."""

    def __init__(self, config: AlchemistConfig, admin_key: str | None = None) -> None:
        self.config = config
        self.admin_key = admin_key  # held by this process only (admin_key.py), never exported
        self.journal = Journal(journal_path(config.state_dir))
        self.router = AdapterRouter(Path(config.state_dir) / "adapters")
        self.feedback = FeedbackService(self.journal, config, call_schedulers, served_by=self.router.served)
        self.internal_token = secrets.token_hex(16)
        self.live_metrics = LiveMetrics()
        self._tasks: set = set()
        self._template_words: set[str] | None = None
        self._chat_text = None
        self._learnt: dict[str, Learnt] = {}  # feedback id -> its prompt, as scope decisions read it
        self._events_lock: asyncio.Lock | None = None

    # --- the served version's scope ---------------------------------------------------------

    def scope_for(self, lineage: list[int]) -> Scope | None:
        """The prompts of the feedback trained into ``lineage``'s versions (None: no scope).

        Built from the journal, which marks feedback trained before a version is announced, so a
        restart and a rollback build the same scope for a version.
        """
        if self.config.adapter_scope == "all" or self.config.cluster_size > 1:
            return None  # a replica's journal holds only its own feedback: a cluster serves the adapter to all
        tokenizer = _tokenizer_manager().tokenizer
        if self._template_words is None:
            self._template_words = template_words(tokenizer)
            self._chat_text = chat_text(tokenizer)
        encoder = background = None
        if self.config.adapter_scope == "feedback":
            encoder = shared_encoder()
            background = meaning_background(encoder) if encoder is not None else None
        scope = Scope(self._template_words, self._chat_text, encoder, background)
        versions = set(lineage) - {0}
        for record in self.journal.trained():
            if record.trained_version in versions:
                learnt = self._learnt.get(record.feedback_id)
                if learnt is None:
                    learnt = self._learnt[record.feedback_id] = scope.describe(tokenizer.decode(record.prompt_ids))
                scope.add(learnt)
        return scope

    async def serve(self, version: int, path: str | None, lineage: list[int]) -> None:
        scope = await asyncio.to_thread(self.scope_for, lineage) if version else None
        await self.router.serve_version(_tokenizer_manager(), version, path, scope)

    # --- auth --------------------------------------------------------------------------------

    def admin_denied(self, request: Request) -> ORJSONResponse | None:
        key = self.admin_key
        if not key:
            return None
        offered = request.headers.get(ADMIN_HEADER)
        authorization = request.headers.get("authorization", "")
        if offered is None and authorization.lower().startswith("bearer "):
            offered = authorization[7:]
        if offered is None or not _same_key(offered, key):
            return openai_error(401, "this endpoint needs the admin key (--alchemist-admin-key, its file or "
                                     "SGLANG_ALCHEMIST_ADMIN_KEY): send 'Authorization: Bearer <key>' or "
                                     "'X-Alchemist-Admin-Key: <key>'")
        return None

    def public_config(self) -> dict[str, Any]:
        """The HTTP process's config for status: whether an admin key is set, never the key."""
        return {**self.config.public_dict(), "admin_key": "<set>" if self.admin_key else None}

    def startup_summary(self) -> str:
        """One line for the log once the server is ready: what is recorded, where, what is served."""
        config = self.config
        recorded = {
            "all": "every request's prefill",
            "sample": f"a random {config.record_sample_rate:.0%} of requests",
            "opt-in": "only requests with custom_params.alchemist_record=true",
            "none": "nothing (feedback trains by recomputation)",
        }[config.record]
        served = self.router.served_version
        serving = f"adapter version {served} ({self.router.status()['served_adapter']})" if served else \
            "adapter version 0 (the base model)"
        admin = "admin endpoints need the admin key" if self.admin_key else "admin endpoints are open (no admin key)"
        return (f"sglang_alchemist: ready: recording {recorded} (--alchemist-record {config.record}); state in "
                f"{Path(config.state_dir).resolve()} (journal {journal_path(config.state_dir).name}, adapters/); "
                f"serving {serving}; {admin}")

    # --- SGLang's /metrics (--enable-metrics) -------------------------------------------------

    def install_sglang_metrics(self, app: FastAPI) -> None:
        """Add the training metrics to SGLang's /metrics; keep their snapshot fresh (runs in the loop)."""
        if not install_on_sglang_metrics(app, self.live_metrics):
            logger.warning("sglang_alchemist: SGLang's /metrics route was not found; the training "
                           "metrics are on /v1/alchemist/metrics only")
            return
        task = asyncio.get_running_loop().create_task(self._refresh_metrics())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_metrics(self, interval_s: float = REFRESH_INTERVAL_S) -> None:
        failures = 0
        while True:
            try:
                replies = await call_schedulers("status")
                if isinstance(replies, ORJSONResponse):
                    raise RuntimeError(replies.body.decode())
                self.live_metrics.update(replies, self.router.status())
                failures = 0
            except Exception as error:  # keep serving the last snapshot; its age says how stale
                failures += 1
                if failures == 1:
                    logger.warning("sglang_alchemist: refreshing the training metrics failed: %s", error)
            await asyncio.sleep(interval_s)

    # --- events from the scheduler ----------------------------------------------------------

    def on_scheduler_event(self, payload: dict[str, Any]) -> None:
        import asyncio

        if payload.get("event") == "version_published":
            task = asyncio.get_running_loop().create_task(
                self._serve(payload["version"], payload["path"], payload["lineage"]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, version: int, path: str | None, lineage: list[int]) -> None:
        # one announced version after the other, in the order announced (an asyncio lock is FIFO):
        # building a scope takes a thread hop, and a later version must not be overtaken
        if self._events_lock is None:
            self._events_lock = asyncio.Lock()
        try:
            async with self._events_lock:
                await self.serve(version, path, lineage)
        except Exception:
            logger.exception("sglang_alchemist: could not serve adapter version %d", version)

    async def sync_served_version(self) -> dict:
        """Serve the scheduler's current version (after a restart, or a rollback)."""
        replies = await call_schedulers("versions")
        if isinstance(replies, ORJSONResponse):
            raise RuntimeError(replies.body.decode())
        reply = replies[0]  # "servable", not "current": that one may not be marked trained yet
        current, path, lineage = reply["servable"], reply["servable_path"], reply["servable_lineage"]
        await self.serve(current, path, lineage)
        return self.router.status()

    # --- routes ------------------------------------------------------------------------------

    def register(self, fastapi_app: FastAPI) -> None:
        import sglang

        api = self
        app = _Routes(fastapi_app)

        async def scheduler_op(request: Request, op: str, with_body: bool = False, payload: dict | None = None,
                               all_replies: bool = False):
            """An admin operation: key check first, then the JSON body (if any), then the scheduler(s).

            Returns the first scheduler's reply (all of them with ``all_replies``) or an error response.
            """
            denied = api.admin_denied(request)
            if denied is not None:
                return denied
            if with_body:
                payload = await _json_object(request)
                if isinstance(payload, ORJSONResponse):
                    return payload
            replies = await call_schedulers(op, payload)
            return replies if isinstance(replies, ORJSONResponse) or all_replies else replies[0]

        @app.post("/v1/feedback")
        async def alchemist_feedback(request: Request):
            return await feedback_route(request, api.feedback, _tokenizer_manager().tokenizer)

        @app.get("/v1/alchemist/status")
        async def alchemist_status(request: Request):
            schedulers = await scheduler_op(request, "status", all_replies=True)
            if isinstance(schedulers, ORJSONResponse):
                return schedulers
            return {
                "object": "alchemist.status",
                "sglang_alchemist_version": __version__,
                "sglang_version": sglang.__version__,
                "served_model_name": _tokenizer_manager().served_model_name,
                "serving": api.router.status(),
                "http_process": {"config": api.public_config()},
                "schedulers": schedulers,
            }

        @app.get("/v1/alchemist/versions")
        async def alchemist_versions(request: Request):
            result = await scheduler_op(request, "versions")
            if isinstance(result, ORJSONResponse):
                return result
            return {"object": "alchemist.versions", **result, **api.router.status()}

        @app.post("/v1/alchemist/rollback")
        async def alchemist_rollback(request: Request):
            denied = api.admin_denied(request)
            if denied is not None:
                return denied
            body = await _json_object(request)
            if isinstance(body, ORJSONResponse):
                return body
            version = body.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                return openai_error(400, "'version' must be a non-negative integer", "version")
            replies = await call_schedulers("rollback", {"version": version})
            if isinstance(replies, ORJSONResponse):
                return replies
            await api.serve(version, replies[0]["path"], replies[0]["lineage"])
            return {"object": "alchemist.rollback", "version": version, **api.router.status()}

        @app.post("/v1/alchemist/pause")
        async def alchemist_pause(request: Request):
            return await scheduler_op(request, "pause")

        @app.post("/v1/alchemist/resume")
        async def alchemist_resume(request: Request):
            return await scheduler_op(request, "resume")

        @app.post("/v1/alchemist/slo")
        async def alchemist_slo(request: Request):
            return await scheduler_op(request, "set_slo", with_body=True)

        @app.post("/v1/alchemist/recording")
        async def alchemist_recording(request: Request):
            return await scheduler_op(request, "set_recording", with_body=True)

        @app.get("/v1/alchemist/completions/{completion_id}")
        async def alchemist_completion(request: Request, completion_id: str):
            denied = api.admin_denied(request)
            if denied is not None:
                return denied
            version = api.router.version_for_request(completion_id)
            if version is None:
                return openai_error(404, f"no response with id {completion_id!r} was served by this process")
            return {"id": completion_id, "adapter_version": version,
                    "adapter_applied": api.router.adapter_applied(completion_id)}

        @app.get("/v1/alchemist/feedback/{feedback_id}")
        async def alchemist_feedback_record(request: Request, feedback_id: str):
            """Where a feedback stands: queued, trained (in which version), rejected or dropped (why)."""
            denied = api.admin_denied(request)
            if denied is not None:
                return denied
            record = await asyncio.to_thread(api.journal.by_id, feedback_id)
            if record is None:
                return openai_error(404, f"no feedback with id {feedback_id!r}")
            return {"object": "alchemist.feedback", **record.public()}

        @app.get("/v1/alchemist/metrics")
        async def alchemist_metrics(request: Request):
            schedulers = await scheduler_op(request, "status", all_replies=True)
            if isinstance(schedulers, ORJSONResponse):
                return schedulers
            return PlainTextResponse(prometheus_text(schedulers, api.router.status()),
                                     media_type="text/plain; version=0.0.4")

        @app.post("/v1/alchemist/internal/sync")
        async def alchemist_internal_sync(request: Request):
            if not _same_key(request.headers.get(INTERNAL_HEADER, ""), api.internal_token):
                return openai_error(403, "internal endpoint")
            return await api.sync_served_version()

        if api.config.debug_endpoints:
            self._register_debug(app, scheduler_op)

    def _register_debug(self, app: _Routes, scheduler_op) -> None:
        @app.get("/v1/alchemist/debug/record/{completion_id}")
        async def alchemist_debug_record(request: Request, completion_id: str):
            """Dump a served response's recorded tensors to a file on the server."""
            return await scheduler_op(request, "debug_record", payload={"id": completion_id})

        @app.post("/v1/alchemist/debug/gradients")
        async def alchemist_debug_gradients(request: Request):
            """LoRA gradients of given items at the trainer's current weights (written to a file)."""
            return await scheduler_op(request, "debug_gradients", with_body=True)

        @app.post("/v1/alchemist/debug/move_to_host")
        async def alchemist_debug_move_to_host(request: Request):
            return await scheduler_op(request, "debug_move_to_host", with_body=True)
