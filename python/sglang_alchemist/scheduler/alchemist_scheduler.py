"""``AlchemistScheduler``: SGLang's Scheduler plus sglang_alchemist, through a few overrides.

The plugin swaps this class in for ``sglang.srt.managers.scheduler.Scheduler`` inside the
scheduler process. SGLang's batching is untouched; everything added hangs off these
overrides, so an SGLang upgrade has one class to check (and ``scheduler/sglang_view.py``, the
one module that reads SGLang's batches and requests):

- ``__init__``: builds the :class:`AlchemistRuntime` once SGLang's model and pools exist; the
  runtime starts the training thread and the publisher thread.
- ``init_request_dispatcher``: routes :class:`AlchemistControlReq` to named operations.
- ``ingest_requests``: tells the SLO controller a prefill is waiting, so training holds.
- ``run_batch``: arms the capture hooks around a prefill forward that records.
- ``process_batch_result``: hands finished requests to the sample table (feedback waits there)
  and the batch's timing to the SLO controller.
- ``on_idle``: housekeeping while no batch runs.

Training itself never runs in this loop: it runs in its own thread (``scheduler/worker.py``).
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
from sglang_alchemist.scheduler.control_ops import ControlError, ControlOps, Deferred
from sglang_alchemist.scheduler.debug_ops import DebugOps
from sglang_alchemist.scheduler.runtime import AlchemistRuntime

logger = logging.getLogger(__name__)


class AlchemistScheduler(Scheduler):
    def __init__(self, server_args, port_args, *args, **kwargs) -> None:
        config = config_from_environment()
        if config is None:
            raise RuntimeError("AlchemistScheduler needs the config exported by sglang_alchemist's launcher")
        self.alchemist: AlchemistRuntime | None = None
        super().__init__(server_args, port_args, *args, **kwargs)
        self.alchemist = AlchemistRuntime(config, self, port_args)
        ops: dict[str, Callable[[dict[str, Any]], Any]] = {"status": self._op_status,
                                                           **ControlOps(self.alchemist).table()}
        if config.debug_endpoints:
            ops.update(DebugOps(self.alchemist).table())
        self._alchemist_ops = ops
        logger.info("sglang_alchemist %s scheduler ready on %s", __version__, self.device)

    @property
    def alchemist_config(self) -> AlchemistConfig:
        return self.alchemist.config

    # --- SGLang overrides -----------------------------------------------------------------

    def init_request_dispatcher(self) -> None:
        super().init_request_dispatcher()
        self._request_dispatcher += TypeBasedDispatcher(
            [(AlchemistControlReq, self.handle_alchemist_control)]
        )

    def ingest_requests(self, *args, **kwargs):
        received = super().ingest_requests(*args, **kwargs)
        if self.alchemist is not None:
            self.alchemist.after_requests_received()
        return received

    def run_batch(self, batch, *args, **kwargs):
        if self.alchemist is None:
            return super().run_batch(batch, *args, **kwargs)
        self.alchemist.before_forward(batch)
        failed = True
        try:
            result = super().run_batch(batch, *args, **kwargs)
            failed = False
            return result
        finally:
            self.alchemist.after_forward(failed=failed)

    def process_batch_result(self, batch, result):
        super().process_batch_result(batch, result)
        if self.alchemist is not None:
            self.alchemist.after_batch_result(batch)

    def on_idle(self):
        super().on_idle()
        if self.alchemist is not None:
            self.alchemist.on_idle()

    # --- control operations ----------------------------------------------------------------

    def handle_alchemist_control(self, request: AlchemistControlReq) -> AlchemistControlReqOutput | None:
        """Run one control operation; any failure becomes an error reply, never a crash.

        A :class:`Deferred` operation runs in the training thread, which sends its reply later
        (None here: SGLang sends nothing now).
        """
        reply = AlchemistControlReqOutput(rid=request.rid, ok=False)
        operation = getattr(self, "_alchemist_ops", {}).get(request.op)
        if operation is None:
            reply.error, reply.status_code = f"unknown or disabled operation {request.op!r}", 404
            return reply
        try:
            result = operation(request.payload)
        except ControlError as error:
            reply.error, reply.status_code = str(error), error.status_code
            return reply
        except Exception as error:  # keep the scheduler serving whatever an operation does
            logger.exception("sglang_alchemist control operation %r failed", request.op)
            reply.error = f"{type(error).__name__}: {error}"
            return reply
        if isinstance(result, Deferred):
            self.alchemist.lane.submit_job(self._deferred_job(request, result))
            return None
        reply.payload, reply.ok = result, True
        return reply

    def _deferred_job(self, request: AlchemistControlReq, deferred: Deferred) -> Callable[[], None]:
        send = self.alchemist.worker_events.send

        def run() -> None:
            reply = AlchemistControlReqOutput(rid=request.rid, ok=False)
            try:
                reply.payload, reply.ok = deferred.job(), True
            except ControlError as error:
                reply.error, reply.status_code = str(error), error.status_code
            except Exception as error:
                logger.exception("sglang_alchemist control operation %r failed", request.op)
                reply.error = f"{type(error).__name__}: {error}"
            send(reply)

        return run

    def _op_status(self, payload: dict[str, Any]) -> dict[str, Any]:
        import sglang

        return {
            "scheduler_class": type(self).__name__,
            "device": str(self.device),
            "cuda_available": torch.cuda.is_available(),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "sglang_version": sglang.__version__,
            "sglang_alchemist_version": __version__,
            "config": self.alchemist_config.public_dict(),
            **self.alchemist.status(),
        }
