"""Which adapter version serves each request, and loading new versions into SGLang.

Routing (a BEFORE hook on ``TokenizerManager._validate_and_resolve_lora``, which runs for every
generate request - OpenAI chat/completions and native ``/generate`` - after the request id is
set and before SGLang resolves adapter names):

- no adapter named (``model`` is the served model, or any name without ``:adapter``) -> the
  latest served version, ``alchemist-vN`` (nothing while version 0, the base model, is served);
- ``model: "<served-model-name>:base"`` (or ``lora_path: "base"``) -> the base model;
- an explicit adapter (``model: "<name>:alchemist-v3"``, ``lora_path``) -> that adapter.

Scope (``--alchemist-adapter-scope feedback``, the default; ``feedback/scope.py``): a request on the
default route whose prompt is not about anything the served version's feedback was about is
answered by the base model; it still counts as served by version N (the version is the adapter
*and* its scope), and its response's ``metadata.alchemist_adapter_applied`` is false. Explicit
adapter names get the adapter everywhere.

The version each request got is remembered by request id, so the response can say which
adapter produced it (``metadata.alchemist_adapter_version``) and so can
``GET /v1/alchemist/completions/{id}``.

Publishing: the scheduler checkpoints version N and sends a ``version_published`` event; this
module loads the checkpoint through SGLang's own ``load_lora_adapter`` (a new adapter id per
version, so radix-cache entries of other versions stay valid and nothing is flushed), then
routes new requests to it. At most ``MAX_LOADED_VERSIONS`` versions stay loaded: the least
recently used ones are unloaded (requests still running on them finish first: SGLang's registry
waits for them; a request naming an unloaded version loads it again from its checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

from sglang_alchemist.feedback.scope import Scope, Traffic
from sglang_alchemist.training.versions import ADAPTER_NAME_PREFIX, adapter_name

logger = logging.getLogger(__name__)

BASE_ALIAS = "base"
MAX_REMEMBERED_REQUESTS = 200_000
MAX_LOADED_VERSIONS = 4  # adapters kept loaded in SGLang (the served one, its predecessor, recent ones)


def version_of_adapter(name: str | None) -> int | None:
    if name is None:
        return 0
    if name.startswith(ADAPTER_NAME_PREFIX) and name[len(ADAPTER_NAME_PREFIX):].isdigit():
        return int(name[len(ADAPTER_NAME_PREFIX):])
    return None


class AdapterRouter:
    def __init__(self, checkpoints_dir=None) -> None:
        self.checkpoints_dir = checkpoints_dir  # <state-dir>/adapters: versions loadable on demand
        self.served_version = 0
        self.loaded: list[int] = []  # our versions currently loaded in SGLang, oldest first
        self._last_routed: dict[int, float] = {}
        self._by_request: OrderedDict[str, tuple[int, bool]] = OrderedDict()  # rid -> (version, adapter applied)
        self._lock: asyncio.Lock | None = None
        # the served version's scope (None: its adapter answers every request on the default route)
        self.scope: Scope | None = None
        self.traffic = Traffic()
        self.scoped_out = 0  # default-route requests answered by the base model since start

    # --- routing ----------------------------------------------------------------------------

    async def route(self, obj: Any, tokenizer: Any = None) -> None:
        """Set ``obj.lora_path`` for a normalized GenerateReqInput (single or batch).

        A scope decision that needs the sentence encoder runs it in a worker thread: the event
        loop keeps serving other requests meanwhile.
        """
        if not hasattr(obj, "lora_path"):
            return  # embedding requests and the like: not ours
        default = adapter_name(self.served_version)
        scope = self.scope  # the served version's, as it is now (a publish may replace it meanwhile)
        rids = [obj.rid] if isinstance(obj.rid, str) else list(obj.rid or [])
        asked = obj.lora_path if isinstance(obj.lora_path, list) else [obj.lora_path] * max(1, len(rids))
        paths, reported = [], []
        for index, path in enumerate(asked):
            resolved = self._resolve(path, default)
            reported.append(resolved)
            if path is None and resolved is not None and scope is not None \
                    and not await self._in_scope(scope, obj, index, tokenizer):
                resolved = None  # the base model answers; the request still belongs to version N
                self.scoped_out += 1
            paths.append(resolved)
        obj.lora_path = paths if isinstance(obj.lora_path, list) or len(set(paths)) > 1 else paths[0]
        for rid, name, path in zip(rids, reported, paths, strict=False):
            version = version_of_adapter(name)
            if version is not None:  # other adapters a user loaded are not ours to report
                self._remember(rid, version, applied=path is not None)
                self._last_routed[version] = time.monotonic()

    async def _in_scope(self, scope: Scope, obj: Any, index: int, tokenizer: Any) -> bool:
        """Whether the served version's scope covers element ``index`` of the request."""
        single = isinstance(obj.rid, str) or getattr(obj, "is_single", True)
        text, ids = getattr(obj, "text", None), getattr(obj, "input_ids", None)
        if not single:  # a batch (parallel samples repeat its prompts)
            text = text[index % len(text)] if isinstance(text, list) and text else None
            ids = ids[index % len(ids)] if isinstance(ids, list) and ids else None
        if text is None and ids and tokenizer is not None:
            text = tokenizer.decode(ids)
        if not isinstance(text, str):
            return True  # embeddings or the like: nothing to judge, the adapter answers
        if scope.covers_by_words(text, self.traffic):
            return True
        if not scope.by_meaning:
            return False
        return await asyncio.to_thread(scope.same_meaning, text)

    @staticmethod
    def _resolve(path: str | None, default: str | None) -> str | None:
        if path is None:
            return default
        if path == BASE_ALIAS:
            return None
        return path

    def _remember(self, rid: str, version: int, applied: bool = True) -> None:
        self._by_request[rid] = (version, applied and version != 0)
        while len(self._by_request) > MAX_REMEMBERED_REQUESTS:
            self._by_request.popitem(last=False)

    def version_for_request(self, rid: str) -> int | None:
        """Our adapter version a request was routed to (0: base), or None if unknown."""
        routed = self._by_request.get(rid)
        return None if routed is None else routed[0]

    def served(self, rid: str) -> tuple[int, bool] | None:
        """(version, whether its adapter answered) of a request this process routed, or None."""
        return self._by_request.get(rid)

    def adapter_applied(self, rid: str) -> bool | None:
        """Whether the version's adapter answered the request (False: its scope left it to the base)."""
        routed = self._by_request.get(rid)
        return None if routed is None else routed[1]

    # --- loading versions -------------------------------------------------------------------

    def _guard(self) -> asyncio.Lock:
        # Created on first use: the lock must belong to the server's event loop.
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def ensure_loaded(self, tokenizer_manager: Any, obj: Any) -> None:
        """Load checkpointed versions a request names explicitly (e.g. after a restart)."""
        paths = obj.lora_path if isinstance(obj.lora_path, list) else [obj.lora_path]
        for version in sorted({version_of_adapter(p) for p in paths if p} - {None, 0}):
            if version in self.loaded or self.checkpoints_dir is None:
                continue
            directory = self.checkpoints_dir / f"v{version}"
            if not (directory / "adapter_model.safetensors").exists():
                # SGLang's own message ("never been loaded") would not say why: the version was
                # never published, or its checkpoint was pruned by --alchemist-keep-checkpoints.
                raise ValueError(
                    f"adapter version {version} ({adapter_name(version)}) is not available: no "
                    f"checkpoint is kept for it (--alchemist-keep-checkpoints keeps the newest ones); "
                    f"kept versions: {self.kept_versions()}"
                )
            await self._load(tokenizer_manager, version, str(directory))

    def kept_versions(self) -> list[int]:
        """Versions with a checkpoint on disk, i.e. loadable by name."""
        if self.checkpoints_dir is None or not self.checkpoints_dir.is_dir():
            return []
        return sorted(int(entry.name[1:]) for entry in self.checkpoints_dir.iterdir()
                      if entry.name[:1] == "v" and entry.name[1:].isdigit()
                      and (entry / "adapter_model.safetensors").exists())

    async def _load(self, tokenizer_manager: Any, version: int, path: str) -> None:
        from sglang.srt.managers.io_struct import LoadLoRAAdapterReqInput

        async with self._guard():
            if version in self.loaded:
                return
            result = await tokenizer_manager.load_lora_adapter(
                LoadLoRAAdapterReqInput(lora_name=adapter_name(version), lora_path=path)
            )
            if not result.success:
                raise RuntimeError(f"loading adapter version {version} failed: {result.error_message}")
            self.loaded.append(version)

    async def serve_version(self, tokenizer_manager: Any, version: int, path: str | None,
                            scope: Scope | None = None) -> None:
        """Load ``version`` into SGLang if needed and route new requests to it (within ``scope``)."""
        from sglang.srt.managers.io_struct import UnloadLoRAAdapterReqInput

        if version != 0:
            await self._load(tokenizer_manager, version, path)
        async with self._guard():
            previous, self.served_version = self.served_version, version
            self.scope = scope
            logger.info("sglang_alchemist: now serving adapter version %d", version)
            # Unload the least recently routed versions beyond the cap; never the served one or
            # its predecessor (requests routed to it a moment ago may still be starting).
            candidates = sorted((v for v in self.loaded if v not in (version, previous)),
                                key=lambda v: self._last_routed.get(v, 0.0))
            for old in candidates[: max(0, len(self.loaded) - MAX_LOADED_VERSIONS)]:
                result = await tokenizer_manager.unload_lora_adapter(
                    UnloadLoRAAdapterReqInput(lora_name=adapter_name(old))
                )
                if result.success:
                    self.loaded.remove(old)
                else:
                    logger.warning("unloading adapter version %d failed: %s", old, result.error_message)

    def status(self) -> dict:
        return {"served_version": self.served_version, "served_adapter": adapter_name(self.served_version),
                "loaded_versions": list(self.loaded),
                "scope": None if self.scope is None else {**self.scope.status(), "answered_by_base": self.scoped_out}}
