"""``AlchemistScheduler``: SGLang's Scheduler plus sglang_alchemist, through a few overrides.

The plugin swaps this class in for ``sglang.srt.managers.scheduler.Scheduler`` inside the
scheduler process. SGLang's batching is untouched; everything added hangs off these
overrides, so an SGLang upgrade has one class to check:

- ``__init__``: builds the :class:`AlchemistRuntime` once SGLang's model and pools exist.
- ``init_request_dispatcher``: routes :class:`AlchemistControlReq` to named operations.
- ``ingest_requests``: notes, per new request, the training that ran since the loop last looked
  for requests (it may have delayed that request: counted in its time to first token).
- ``run_batch``: arms the capture hooks around a prefill forward that records.
- ``process_batch_result``: hands finished requests to the sample table (feedback waits there),
  then runs training slices within the SLO controller's grant.
- ``on_idle``: training slices (larger grants) and housekeeping while no batch runs.
- ``maybe_sleep_on_idle``: never sleeps while training work is pending.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.managers.io_struct import BatchTokenizedGenerateReqInput, TokenizedGenerateReqInput
from sglang.srt.managers.scheduler import Scheduler
from sglang.utils import TypeBasedDispatcher

from sglang_alchemist import __version__
from sglang_alchemist.config import AlchemistConfig, config_from_environment
from sglang_alchemist.ipc import AlchemistControlReq, AlchemistControlReqOutput
from sglang_alchemist.scheduler.runtime import AlchemistRuntime, ControlError

logger = logging.getLogger(__name__)


class AlchemistScheduler(Scheduler):
    def __init__(self, server_args, port_args) -> None:
        config = config_from_environment()
        if config is None:
            raise RuntimeError("AlchemistScheduler needs the config exported by sglang_alchemist's launcher")
        self.alchemist_config: AlchemistConfig = config
        self.alchemist: AlchemistRuntime | None = None
        super().__init__(server_args, port_args)
        self.alchemist = AlchemistRuntime(config, self)
        runtime = self.alchemist
        ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "status": self._op_status,
            "lookup": runtime.op_lookup,
            "enqueue": runtime.op_enqueue,
            "drop": runtime.op_drop,
            "versions": runtime.op_versions,
            "rollback": runtime.op_rollback,
            "pause": runtime.op_pause,
            "resume": runtime.op_resume,
            "set_slo": runtime.op_set_slo,
            "set_recording": runtime.op_set_recording,
        }
        if config.debug_endpoints:
            ops.update(
                debug_record=runtime.op_debug_record,
                debug_gradients=runtime.op_debug_gradients,
                debug_move_to_host=runtime.op_debug_move_to_host,
            )
        self._alchemist_ops = ops
        logger.info("sglang_alchemist %s scheduler ready on %s", __version__, self.device)

    # --- SGLang overrides -----------------------------------------------------------------

    def init_request_dispatcher(self) -> None:
        super().init_request_dispatcher()
        self._request_dispatcher += TypeBasedDispatcher(
            [(AlchemistControlReq, self.handle_alchemist_control)]
        )

    def ingest_requests(self, *args, **kwargs):
        if self.alchemist is None:
            return super().ingest_requests(*args, **kwargs)
        training_before = self.alchemist.take_training_since_ingest()
        received = super().ingest_requests(*args, **kwargs)
        rids = [item.rid for request in received or ()
                for item in (request.batch if isinstance(request, BatchTokenizedGenerateReqInput) else [request])
                if isinstance(item, TokenizedGenerateReqInput)]
        if rids:
            self.alchemist.on_requests_received(rids, training_before)
        return received

    def run_batch(self, batch, *args, **kwargs):
        if self.alchemist is None:
            return super().run_batch(batch, *args, **kwargs)
        self.alchemist.before_forward(batch)
        try:
            return super().run_batch(batch, *args, **kwargs)
        finally:
            self.alchemist.after_forward()

    def process_batch_result(self, batch, result):
        super().process_batch_result(batch, result)
        if self.alchemist is not None:
            running = len(batch.reqs) + len(self.running_batch.reqs)
            self.alchemist.after_batch_result(batch, running=running, waiting=len(self.waiting_queue))

    def on_idle(self):
        super().on_idle()
        if self.alchemist is not None:
            self.alchemist.on_idle(running=len(self.running_batch.reqs), waiting=len(self.waiting_queue))

    def maybe_sleep_on_idle(self):
        # With --sleep-on-idle SGLang blocks here for up to a second; not while training waits.
        if self.alchemist is not None and self.alchemist.lane.has_work():
            return
        super().maybe_sleep_on_idle()

    # --- control operations ----------------------------------------------------------------

    def handle_alchemist_control(self, request: AlchemistControlReq) -> AlchemistControlReqOutput:
        """Run one control operation; any failure becomes an error reply, never a crash."""
        reply = AlchemistControlReqOutput(rid=request.rid, ok=False)
        operation = getattr(self, "_alchemist_ops", {}).get(request.op)
        if operation is None:
            reply.error, reply.status_code = f"unknown or disabled operation {request.op!r}", 404
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
            "device": str(self.device),
            "cuda_available": torch.cuda.is_available(),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "sglang_version": sglang.__version__,
            "sglang_alchemist_version": __version__,
            "config": self.alchemist_config.public_dict(),
            **self.alchemist.status(),
        }
