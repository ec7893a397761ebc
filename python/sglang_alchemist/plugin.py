"""SGLang plugin entry point (group ``sglang.srt.plugins``): installs sglang_alchemist.

SGLang calls :func:`register` once in *every* process it starts (HTTP/tokenizer, scheduler,
detokenizer), before it builds anything, and then applies the hooks registered here. This is
the complete list of what sglang_alchemist changes in SGLang:

HTTP process
- routes on SGLang's FastAPI app (``api/routes.py``);
- AFTER ``TokenizerControlMixin.init_communicators``: the control channel to the scheduler;
- AROUND ``TokenizerManager._validate_and_resolve_lora``: route each request to the served
  adapter version, loading a checkpointed version a request names explicitly
  (``api/adapters.py``);
- AFTER ``build_endpoint_weight_version_metadata``: a response's ``metadata`` says which
  adapter version produced it;
- AROUND ``OpenAIServingChat._handle_streaming_request`` and
  ``OpenAIServingCompletion._handle_streaming_request``: streaming responses carry the adapter
  version too (``X-Alchemist-Adapter-Version`` header, ``metadata`` of each finishing chunk;
  ``api/streaming.py``);
- AFTER ``add_prometheus_middleware`` (only runs with ``--enable-metrics``): the training
  metrics also on SGLang's own ``/metrics`` (``api/metrics.py``);
- AROUND ``http_server._wait_and_warmup``: before SGLang's warm-up marks the server healthy,
  load and serve the adapter version the scheduler restored from the state directory; once
  ready, log what is recorded, where the state lives and which version is served (and a
  warning when the admin endpoints are open on a non-loopback host).

Scheduler process
- REPLACE ``Scheduler`` with ``AlchemistScheduler``;
- on CPU-only machines, the pin-memory guard (``compat/cpu.py``).

The plugin is active only when sglang_alchemist's launcher exported its config; a plain
``sglang serve`` on a machine where this package happens to be installed is left untouched.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time

from sglang_alchemist.config import AlchemistConfig, config_from_environment

logger = logging.getLogger(__name__)

SCHEDULER_MODULE = "sglang.srt.managers.scheduler"


def _is_http_process() -> bool:
    # SGLang's HTTP server runs in the process the user started; every other SGLang process
    # is a spawned child.
    return multiprocessing.parent_process() is None


def _is_scheduler_process() -> bool:
    # A spawned scheduler has imported the scheduler module (its target function lives there)
    # before SGLang calls load_plugins(); the detokenizer has not.
    return not _is_http_process() and SCHEDULER_MODULE in sys.modules


def register() -> None:
    config = config_from_environment()
    if config is None:
        return
    if _is_scheduler_process():
        _register_scheduler_process()
    elif _is_http_process():
        _register_http_process(config)


def _register_scheduler_process() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_alchemist.compat.cpu import install_pin_memory_guard
    from sglang_alchemist.scheduler.alchemist_scheduler import AlchemistScheduler

    install_pin_memory_guard()
    HookRegistry.register(f"{SCHEDULER_MODULE}.Scheduler", AlchemistScheduler, HookType.REPLACE)


def _register_http_process(config: AlchemistConfig) -> None:
    from sglang.srt.entrypoints.http_server import app
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_alchemist.admin_key import held_admin_key, open_admin_warning
    from sglang_alchemist.api.control_channel import install_control_channel
    from sglang_alchemist.api.routes import INTERNAL_HEADER, AlchemistApi
    from sglang_alchemist.api.streaming import annotate_streaming_response

    api = AlchemistApi(config, admin_key=held_admin_key(config))
    api.register(app)

    def after_init_communicators(result, tokenizer_manager, *args, **kwargs):
        install_control_channel(tokenizer_manager, api.on_scheduler_event)
        return result

    async def around_resolve_lora(original, tokenizer_manager, obj, *args, **kwargs):
        await api.router.route(obj, getattr(tokenizer_manager, "tokenizer", None))
        await api.router.ensure_loaded(tokenizer_manager, obj)
        return await original(tokenizer_manager, obj, *args, **kwargs)

    def after_weight_version_metadata(metadata, meta_info, *args, **kwargs):
        version = api.router.version_for_request(meta_info.get("id", ""))
        if version is not None:
            metadata = dict(metadata or {})
            metadata["alchemist_adapter_version"] = version
            metadata["alchemist_adapter_applied"] = api.router.adapter_applied(meta_info.get("id", ""))
        return metadata

    async def around_streaming(original, serving, adapted_request, *args, **kwargs):
        response = await original(serving, adapted_request, *args, **kwargs)
        return annotate_streaming_response(response, api.router, adapted_request)

    def after_add_prometheus_middleware(result, fastapi_app, *args, **kwargs):
        api.install_sglang_metrics(fastapi_app)  # called in SGLang's lifespan, on the server's loop
        return result

    def around_wait_and_warmup(original, server_args, *args, **kwargs):
        _restore_served_version(server_args, api.internal_token, INTERNAL_HEADER)
        result = original(server_args, *args, **kwargs)
        warning = open_admin_warning(server_args.host, api.admin_key)
        if warning:
            logger.warning(warning)
        logger.info(api.startup_summary())
        return result

    register_hook = HookRegistry.register
    register_hook("sglang.srt.managers.tokenizer_control_mixin.TokenizerControlMixin.init_communicators",
                  after_init_communicators, HookType.AFTER)
    register_hook("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_and_resolve_lora",
                  around_resolve_lora, HookType.AROUND)
    register_hook("sglang.srt.utils.weight_versions.build_endpoint_weight_version_metadata",
                  after_weight_version_metadata, HookType.AFTER)
    register_hook("sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._handle_streaming_request",
                  around_streaming, HookType.AROUND)
    register_hook("sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion."
                  "_handle_streaming_request", around_streaming, HookType.AROUND)
    register_hook("sglang.srt.utils.common.add_prometheus_middleware", after_add_prometheus_middleware,
                  HookType.AFTER)
    register_hook("sglang.srt.entrypoints.http_server._wait_and_warmup", around_wait_and_warmup, HookType.AROUND)


def _restore_served_version(server_args, token: str, header: str, timeout_s: float = 300.0) -> None:
    """Runs in SGLang's warm-up thread: once HTTP answers, serve the scheduler's current version."""
    import requests
    from sglang.srt.runtime_context import get_serving

    url = server_args.url()
    headers = {header: token}
    if get_serving().api_key:  # SGLang's key check applies to every route
        headers["Authorization"] = f"Bearer {get_serving().api_key}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = requests.post(url + "/v1/alchemist/internal/sync", headers=headers, timeout=120)
            if response.status_code == 200:
                logger.info("sglang_alchemist: serving %s", response.json())
                return
            logger.warning("sglang_alchemist: restoring the served adapter failed: %s", response.text)
            return
        except requests.exceptions.RequestException:
            time.sleep(0.5)
    logger.error("sglang_alchemist: the server did not answer; the base model is served")
