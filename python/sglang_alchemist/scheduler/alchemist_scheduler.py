"""``AlchemistScheduler``: SGLang's Scheduler plus sglang_alchemist's control operations.

The plugin swaps this class in for ``sglang.srt.managers.scheduler.Scheduler`` inside the
scheduler process. It keeps SGLang's batching untouched; everything it adds hangs off a few
overrides, so an SGLang upgrade has one class to check:

- ``init_request_dispatcher``: routes :class:`AlchemistControlReq` to named operations.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.managers.scheduler import Scheduler
from sglang.utils import TypeBasedDispatcher

from sglang_alchemist import __version__
from sglang_alchemist.config import AlchemistConfig, config_from_environment
from sglang_alchemist.ipc import AlchemistControlReq, AlchemistControlReqOutput

logger = logging.getLogger(__name__)


class ControlError(Exception):
    """A control operation refused with an HTTP status the route passes on (e.g. 404)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class AlchemistScheduler(Scheduler):
    def __init__(self, server_args, port_args) -> None:
        config = config_from_environment()
        if config is None:
            raise RuntimeError("AlchemistScheduler needs the config exported by sglang_alchemist's launcher")
        self.alchemist_config: AlchemistConfig = config
        self._alchemist_ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "status": self._op_status,
        }
        super().__init__(server_args, port_args)
        logger.info("sglang_alchemist %s scheduler ready on %s", __version__, self.device)

    # --- SGLang overrides -----------------------------------------------------------------

    def init_request_dispatcher(self) -> None:
        super().init_request_dispatcher()
        self._request_dispatcher += TypeBasedDispatcher(
            [(AlchemistControlReq, self.handle_alchemist_control)]
        )

    # --- control operations ----------------------------------------------------------------

    def handle_alchemist_control(self, request: AlchemistControlReq) -> AlchemistControlReqOutput:
        """Run one control operation; any failure becomes an error reply, never a crash."""
        reply = AlchemistControlReqOutput(rid=request.rid, ok=False)
        operation = self._alchemist_ops.get(request.op)
        if operation is None:
            reply.error, reply.status_code = f"unknown operation {request.op!r}", 400
            return reply
        try:
            reply.payload, reply.ok = operation(request.payload), True
        except ControlError as error:
            reply.error, reply.status_code = str(error), error.status_code
        except Exception as error:  # keep the scheduler serving whatever an operation does
            logger.exception("sglang_alchemist control operation %r failed", request.op)
            reply.error = f"{type(error).__name__}: {error}"
        return reply

    def _op_status(self, payload: dict[str, Any]) -> dict[str, Any]:
        import sglang

        return {
            "scheduler_class": type(self).__name__,
            "scheduler_bases": [cls.__name__ for cls in type(self).__mro__[1:3]],
            "device": str(self.device),
            "cuda_available": torch.cuda.is_available(),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "sglang_version": sglang.__version__,
            "sglang_alchemist_version": __version__,
            "config": self.alchemist_config.public_dict(),
        }
