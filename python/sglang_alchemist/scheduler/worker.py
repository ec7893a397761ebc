"""The training thread: training runs beside SGLang's scheduler loop, never inside it.

Measured on CPU (docs/NOTES.md, "Training beside serving"): slicing training into SGLang's loop
leaves it two bad choices - slices that fit the gaps are too small to make progress under load,
slices that make progress delay decode steps and arriving prefills. A thread of its own fixes
both, with what the platform already gives:

- **CPU.** The thread runs at the lowest priority (``nice 19``, per thread on Linux), so the
  kernel's scheduler hands every core serving wants to serving - within microseconds, mid-slice
  - and training gets the cycles serving leaves: idle time, and the gaps of a decode step.
  Its intra-op (OpenMP) threads are created by it and inherit its priority. While requests
  are being served, and between requests under traffic (the controller's ``between_requests``
  grants), it computes on one intra-op thread (``SERVING_TRAINING_THREADS``), on an idle
  engine on as many as serving uses: measured on 2 cores, serving's decode loop keeps
  about one core busy and its second OpenMP thread mostly waits, and a two-thread training
  team there only runs as fast as its starved member while competing with serving's worker
  on the other core (docs/NOTES.md). ``torch.set_num_threads`` called in this thread sets
  this thread's OpenMP and MKL thread counts; serving's thread keeps its own. (Computing on one
  thread while requests are served was tried: training then made no progress under
  back-to-back traffic on 2 cores, ``test_slo_scheduler``.)
  PyTorch ops release the GIL, so the two threads overlap their math; the GIL switch interval
  is lowered (``GIL_SWITCH_S``) so serving's Python never waits long for training's.
- **CUDA.** The thread issues its kernels on a stream of its own (the lowest priority the device
  offers), so training kernels queue behind serving's instead of before them.

On top of that the SLO controller (``scheduler/controller.py``) keeps the latency targets the
OS does not know about: no slice while a prefill waits, a duty cycle while requests decode, and
short slices, so a pause takes effect quickly.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import torch

from sglang_alchemist.scheduler.controller import WAIT_RECHECK_S, SloController
from sglang_alchemist.scheduler.training_lane import TrainingLane

logger = logging.getLogger(__name__)

NICENESS = 19
GIL_SWITCH_S = 0.001
SERVING_TRAINING_THREADS = 1  # intra-op threads of a training slice while requests are served (CPU)


class TrainingWorker:
    def __init__(self, lane: TrainingLane, controller: SloController, device: torch.device) -> None:
        self.lane = lane
        self.controller = controller
        self.device = device
        self.errors = 0
        self.threads = 0  # intra-op threads of the last grant (CPU), for the status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alchemist-trainer", daemon=True)

    def start(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_S)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self.lane.wake.set()
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _lower_priority(self) -> None:
        if self.device.type == "cuda":
            return
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
        except (OSError, AttributeError) as error:  # not Linux, or not allowed: training still runs
            logger.warning("sglang_alchemist: could not lower the training thread's priority: %s", error)

    def _use_threads(self, count: int) -> None:
        if count != self.threads:
            torch.set_num_threads(count)  # this thread's intra-op threads (see the module doc)
            self.threads = count

    def _run(self) -> None:
        self._lower_priority()
        stream = None
        if self.device.type == "cuda":
            low, _ = torch.cuda.Stream.priority_range()  # numerically larger = lower priority
            stream = torch.cuda.Stream(self.device, priority=low)
        idle_threads = torch.get_num_threads()  # serving's count, inherited by this thread
        with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else _nothing()):
            while not self._stop.is_set():
                lane, controller = self.lane, self.controller
                lane.run_jobs()
                grant = controller.grant(lane.has_work(), lane.paused)
                if grant.budget_s <= 0:
                    lane.wake.wait(WAIT_RECHECK_S if grant.reason != "no_work" else 1.0)
                    lane.wake.clear()
                    continue
                if self.device.type == "cpu":
                    self._use_threads(idle_threads if grant.reason == "idle"
                                      else min(idle_threads, SERVING_TRAINING_THREADS))
                started = time.monotonic()
                controller.training_began()
                try:
                    lane.run(grant, controller)
                except Exception:  # the thread must survive anything a slice does
                    self.errors += 1
                    logger.exception("sglang_alchemist: the training thread caught an error (training continues)")
                finally:
                    controller.training_ended()
                rest = controller.rest_after(grant, time.monotonic() - started)
                if rest > 0:
                    self._stop.wait(rest)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
