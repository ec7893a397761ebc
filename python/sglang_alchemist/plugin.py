"""SGLang plugin entry point (group ``sglang.srt.plugins``): installs sglang_alchemist.

SGLang calls :func:`register` once in *every* process it starts (HTTP/tokenizer, scheduler,
detokenizer), before it builds anything, and then applies the hooks registered here. What each
process gets:

- HTTP process: the ``/v1/alchemist/*`` routes on SGLang's FastAPI app and the control channel
  to the scheduler (an AFTER hook on the TokenizerManager's communicator set-up).
- Scheduler process: ``AlchemistScheduler`` in place of SGLang's ``Scheduler`` (a class
  REPLACE), and on CPU-only machines the pin-memory guard (see ``compat/cpu.py``).

The plugin is active only when sglang_alchemist's launcher exported its config; a plain
``sglang serve`` on a machine where this package happens to be installed is left untouched.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys

from sglang_alchemist.config import config_from_environment

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
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if _is_scheduler_process():
        from sglang_alchemist.compat.cpu import install_pin_memory_guard
        from sglang_alchemist.scheduler.alchemist_scheduler import AlchemistScheduler

        install_pin_memory_guard()
        HookRegistry.register(f"{SCHEDULER_MODULE}.Scheduler", AlchemistScheduler, HookType.REPLACE)
    elif _is_http_process():
        from sglang.srt.entrypoints.http_server import app

        from sglang_alchemist.api.control_channel import install_control_channel
        from sglang_alchemist.api.routes import register_routes

        def after_init_communicators(result, tokenizer_manager, *args, **kwargs):
            install_control_channel(tokenizer_manager)
            return result

        HookRegistry.register(
            "sglang.srt.managers.tokenizer_control_mixin.TokenizerControlMixin.init_communicators",
            after_init_communicators,
            HookType.AFTER,
        )
        register_routes(app, config)
