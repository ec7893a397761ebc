"""The cluster's front door: one HTTP endpoint in front of N replicas (aiohttp).

sglang-router balances OpenAI routes but knows nothing of ``/v1/feedback`` or
``/v1/alchemist/*``, and a feedback must reach the replica that served the completion (only
that replica recorded its activations and knows its prompt). So the front door:

- forwards OpenAI/SGLang routes round-robin over the healthy replicas, bodies and streams
  unchanged (a stream is passed through chunk by chunk); it reads the completion ``id`` of each
  response (the first SSE event of a stream) and remembers which replica served it (a bounded
  map, ``MAX_IDS``);
- forwards ``POST /v1/feedback`` to that replica; for an id it does not know (an old one, or
  the front door restarted) it asks the replicas in turn until one does not answer 404 (a 404
  stores nothing, so asking is safe); a feedback without ``id`` (an exchange the cluster did not
  serve) goes to any replica; the body is forwarded byte for byte;
- forwards ``/v1/alchemist/*`` to replica 0, except: ``pause``/``resume``/``slo``/``recording``
  go to every replica (the lockstep rounds need them alike; the answer is replica 0's),
  ``completions/{id}`` and ``feedback/{id}`` go to the replica that served / took them,
  ``rollback`` is refused (409: a rollback of one replica would fork the lineage), and
  ``GET /v1/alchemist/cluster`` lists the replicas with their health, restarts and served
  version (admin auth: the request's headers are checked by replica 0);
- ``GET /health`` is 200 once every replica has been healthy once and while at least one is.

Auth is the replicas' own (SGLang's ``--api-key``, the admin key): headers are forwarded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

logger = logging.getLogger(__name__)

MAX_IDS = 200_000
HEALTH_INTERVAL_S = 1.0
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
              "proxy-connection", "te", "trailer"}
BROADCAST = {"/v1/alchemist/pause", "/v1/alchemist/resume", "/v1/alchemist/slo", "/v1/alchemist/recording"}
RECORDED = {"/v1/chat/completions", "/v1/completions", "/generate"}
ID_PATTERN = re.compile(rb'"id"\s*:\s*"([^"\\]{1,200})"')
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 409: "conflict_error",
               413: "invalid_request_error", 503: "service_unavailable_error"}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict | None = None) -> web.Response:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}
    return web.json_response(body, status=status, headers=headers)


@dataclass
class Replica:
    index: int
    rank: int
    url: str
    healthy: bool = False
    ever_healthy: bool = False
    restarts: int = 0
    pid: int | None = None
    state_dir: str | None = None
    log_path: str | None = None


class IdMap:
    """Which replica served an id (bounded: the oldest ids are forgotten first)."""

    def __init__(self, size: int = MAX_IDS) -> None:
        self.size = size
        self._ids: OrderedDict[str, int] = OrderedDict()

    def put(self, key: str, replica: int) -> None:
        self._ids[key] = replica
        self._ids.move_to_end(key)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def get(self, key: str) -> int | None:
        return self._ids.get(key)


@dataclass
class FrontDoor:
    replicas: list[Replica]
    max_feedback_bytes: int = 1_000_000
    ids: IdMap = field(default_factory=IdMap)
    session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self._turn = itertools.count()
        self._health_task: asyncio.Task | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 ** 3)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self.session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False,
                                             connector=aiohttp.TCPConnector(limit=0))
        self._health_task = asyncio.create_task(self._watch_health())

    async def _stop(self, app) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self.session is not None:
            await self.session.close()

    async def _watch_health(self) -> None:
        while True:
            await asyncio.gather(*(self._check(replica) for replica in self.replicas))
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def _check(self, replica: Replica) -> None:
        try:
            async with self.session.get(replica.url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                healthy = r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            healthy = False
        replica.healthy = healthy
        replica.ever_healthy = replica.ever_healthy or healthy

    # --- routing ----------------------------------------------------------------------------------

    def _any(self) -> Replica | None:
        healthy = [r for r in self.replicas if r.healthy]
        if not healthy:
            return None
        return healthy[next(self._turn) % len(healthy)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/health":
            ready = all(r.ever_healthy for r in self.replicas) and any(r.healthy for r in self.replicas)
            return web.Response(status=200 if ready else 503)
        if path == "/v1/feedback" and request.method == "POST":
            return await self._feedback(request)
        if path.startswith("/v1/alchemist/"):
            return await self._admin(request, path)
        if path == "/metrics":
            return await self._forward(self.replicas[0], request, await request.read())
        body = await request.read()
        replica = self._any()
        if replica is None:
            return error_response(503, "no replica is healthy; retry later", headers={"Retry-After": "5"})
        try:
            return await self._forward(replica, request, body, record=path in RECORDED)
        except (aiohttp.ClientConnectionError, TimeoutError):
            replica.healthy = False  # it died since the last health check: one retry elsewhere
            other = self._any()
            if other is None:
                return error_response(503, "no replica is healthy; retry later", headers={"Retry-After": "5"})
            return await self._forward(other, request, body, record=path in RECORDED)

    async def _feedback(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_limited(request)
        if body is None:
            return error_response(413, f"request body larger than {self.max_feedback_bytes} bytes "
                                       f"(--alchemist-max-feedback-bytes)")
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            parsed = None  # malformed: forwarded as is, the replica answers with its own 400
        completion_id = parsed["id"] if isinstance(parsed, dict) and isinstance(parsed.get("id"), str) else None
        if completion_id is None:
            replica = self._any()
            if replica is None:
                return error_response(503, "no replica is healthy; retry later", headers={"Retry-After": "5"})
            return await self._forward(replica, request, body, record_feedback=True)
        known = self.ids.get(completion_id)
        candidates = [self.replicas[known]] if known is not None else list(self.replicas)
        last = None
        for replica in candidates:
            try:
                response = await self._forward(replica, request, body, record_feedback=True)
            except (aiohttp.ClientConnectionError, TimeoutError):
                if known is not None:
                    return error_response(503, f"replica {replica.index}, which served completion "
                                               f"{completion_id!r}, is restarting; retry later", "id",
                                          headers={"Retry-After": "10"})
                continue
            if response.status != 404:
                self.ids.put(completion_id, replica.index)
                return response
            last = response
        return last or error_response(404, f"no response with id {completion_id!r} was served by this cluster", "id")

    async def _read_limited(self, request: web.Request) -> bytes | None:
        if request.content_length is not None and request.content_length > self.max_feedback_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self.max_feedback_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _admin(self, request: web.Request, path: str) -> web.StreamResponse:
        body = await request.read()
        if path == "/v1/alchemist/cluster":
            return await self._cluster(request)
        if path == "/v1/alchemist/rollback":
            return error_response(409, "rollback is not supported on a cluster: rolling back one replica "
                                       "would fork the adapter lineage the replicas train in lockstep")
        if path in BROADCAST and request.method == "POST":
            responses = await asyncio.gather(*(self._forward(r, request, body) for r in self.replicas),
                                             return_exceptions=True)
            for response in responses:
                if isinstance(response, web.StreamResponse):
                    return response
            return error_response(503, "no replica answered; retry later", headers={"Retry-After": "5"})
        target = self.replicas[0]
        for prefix in ("/v1/alchemist/completions/", "/v1/alchemist/feedback/"):
            if path.startswith(prefix):
                index = self.ids.get(path[len(prefix):])
                target = self.replicas[index] if index is not None else target
        try:
            return await self._forward(target, request, body)
        except (aiohttp.ClientConnectionError, TimeoutError):
            return error_response(503, f"replica {target.index} is restarting; retry later",
                                  headers={"Retry-After": "10"})

    async def _cluster(self, request: web.Request) -> web.StreamResponse:
        headers = _forward_headers(request)

        async def describe(replica: Replica) -> tuple[int | None, dict]:
            entry = {"index": replica.index, "rank": replica.rank, "url": replica.url, "healthy": replica.healthy,
                     "restarts": replica.restarts, "pid": replica.pid, "state_dir": replica.state_dir,
                     "log": replica.log_path, "served_version": None, "version": None, "cluster": None}
            try:
                async with self.session.get(replica.url + "/v1/alchemist/status", headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=30)) as response:
                    if response.status != 200:
                        return response.status, entry
                    status = await response.json()
                entry["served_version"] = status.get("serving", {}).get("served_version")
                scheduler = (status.get("schedulers") or [{}])[0]
                entry["version"] = scheduler.get("versions", {}).get("current")
                entry["cluster"] = scheduler.get("training", {}).get("cluster")
                entry["queue_depth"] = scheduler.get("training", {}).get("queue_depth")
                return 200, entry
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
                return None, entry

        results = await asyncio.gather(*(describe(r) for r in self.replicas))
        if results and results[0][0] == 401:
            return error_response(401, "admin key required (checked by replica 0)")
        return web.json_response({"object": "alchemist.cluster", "replicas": [entry for _, entry in results]})

    # --- forwarding -----------------------------------------------------------------------------

    async def _forward(self, replica: Replica, request: web.Request, body: bytes, record: bool = False,
                       record_feedback: bool = False) -> web.StreamResponse:
        url = replica.url + request.rel_url.path_qs
        upstream = await self.session.request(request.method, url, headers=_forward_headers(request), data=body)
        try:
            headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            streaming = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
            if not streaming:
                data = await upstream.read()
                if (record and upstream.status == 200) or (record_feedback and upstream.status == 202):
                    self._remember(data, replica)
                return web.Response(status=upstream.status, body=data, headers=headers)
            response = web.StreamResponse(status=upstream.status, headers=headers)
            await response.prepare(request)
            head = b""
            async for chunk in upstream.content.iter_any():
                if record and head is not None:
                    head += chunk
                    if self._remember(head, replica) or len(head) > 65536:
                        head = None
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            upstream.release()

    def _remember(self, data: bytes, replica: Replica) -> bool:
        match = ID_PATTERN.search(data)
        if match is None:
            return False
        self.ids.put(match.group(1).decode(), replica.index)
        return True


def _forward_headers(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
