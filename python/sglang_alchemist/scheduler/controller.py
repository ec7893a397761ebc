"""The SLO controller: when the training thread may run, how long its slices may be, and the SLO accounting.

Training runs in its own thread (``scheduler/worker.py``) at the lowest CPU priority, so the
operating system already gives every cycle serving wants to serving, and training gets the
rest: idle time between requests and the cycles a decode step leaves unused. What the OS does
not see is the serving-latency target, so between two slices the worker asks :meth:`grant`:

1. **Paused, or nothing to train** -> wait.
2. **A prefill is waiting** (a request was received and not yet prefilled) -> wait until the
   prefill has run: nothing may delay a first token (``--alchemist-ttft-slo-ms``).
3. **Requests are decoding** -> run, with a duty cycle: each grant lasts ``duty x PERIOD_S``
   and is followed by a rest that keeps the real share of time at ``duty`` even when a slice
   overruns (:meth:`rest_after`); no slice is planned longer than the grant, nor than
   ``SLICE_FRACTION`` of ``--alchemist-tpot-slo-ms``. The duty follows the *measured* time per
   output token: additive increase while the recent TPOT is within the *limit*, multiplicative
   decrease above it, down to 0 (no training while requests decode), and never above
   ``--alchemist-train-share``. The limit starts at ``(1 - SAFETY_MARGIN)`` of the target; once
   the *baseline* is known (the median TPOT of recent decode steps during which no training ran)
   it is the baseline plus ``HEADROOM_SHARE`` (30%) of the headroom up to that, and never less than
   ``(1 + TPOT_ALLOWANCE)`` times the baseline. So training uses under a third of the headroom when
   serving leaves some (a limit at the headroom's top held the median there and sent requests'
   TPOT p99 past the target at 80% load: measured, docs/NOTES.md), and when serving alone is
   already at or past the target (a slow machine, a large batch) it may add at most
   ``TPOT_ALLOWANCE`` to what serving costs without it.
4. **Between requests** (nothing runs or waits, but something did within ``TRAFFIC_GAP_S``) ->
   run, in slices of at most ``BETWEEN_SLICE_CAP_S``, on one intra-op thread (the worker): under
   traffic the next request is likely to arrive mid-slice, and its prefill then shares the
   cores with the slice until it ends (measured: TTFT p90 x1.8 at 80% load with idle-length
   slices on two threads).
5. **Idle engine** -> run, in slices of at most ``IDLE_SLICE_FRACTION`` of the TTFT target on
   all of serving's threads (a request that arrives mid-slice preempts it at the OS level; on a
   GPU, where nothing preempts a kernel queue, the slice length bounds its wait).

The cost model (``scheduler/cost_model.py``) turns the slice bound into rows per slice.

Accounting (``status()``), from the scheduler thread's own clock: every decode step's time per
output token is the time since the previous decode step ended, less serving's own prefill
batches in between; SLO attainment is the share within the target. Every request's time to
first token runs from its entry into SGLang's waiting queue to the end of the prefill that
produced its first token (the HTTP and tokenizer time before is not seen here); TTFT
attainment is the share within ``--alchemist-ttft-slo-ms``. Clients measure both end to end in
``benchmark/serving_impact.py``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from sglang_alchemist.scheduler.cost_model import SliceCostModel

SLICE_FRACTION = 0.1  # longest slice while requests decode, as a share of the TPOT target (a request arriving
# mid-slice waits for it: 0.25 left TTFT p90 x1.5 at 80% load)
IDLE_SLICE_FRACTION = 0.05  # longest slice on an idle engine, as a share of the TTFT target
IDLE_SLICE_CAP_S = 0.25
TRAFFIC_GAP_S = 2.0  # an engine idle for less than this since its last request is "between requests"
BETWEEN_SLICE_CAP_S = 0.025  # longest slice between requests
HEADROOM_SHARE = 0.3  # of the headroom between serving's own TPOT and the limit, what training may use
PERIOD_S = 0.1  # a decode-time grant and its rest add up to this
SAFETY_MARGIN = 0.1  # of the TPOT target, kept free for noise
TPOT_ALLOWANCE = 0.05  # what training may add to serving's own TPOT when that is past the target
DUTY_STEP = 0.05
MIN_DUTY = 0.05  # below this the duty is 0: a sliver of a grant is all overhead
RECENT_DECODES = 16
WAIT_RECHECK_S = 0.02


@dataclass
class Grant:
    budget_s: float  # run slices for this long (0: wait)
    reason: str  # "paused", "no_work", "waiting_prefill", "decode_held", "decode", "between_requests", "idle"
    max_slice_s: float = 0.0
    rest_s: float = 0.0  # after the budget, sleep this long (decode duty cycle)


@dataclass
class ControllerCounters:
    decode_steps: int = 0
    decode_steps_within_slo: int = 0
    grants: dict = field(default_factory=dict)
    slices_by_grant: dict = field(default_factory=dict)
    training_seconds: float = 0.0
    serving_seconds: float = 0.0
    slices_run: int = 0
    longest_decode_slice_s: float = 0.0
    worst_tpot_s: float = 0.0
    first_tokens: int = 0
    first_tokens_within_slo: int = 0
    worst_ttft_s: float = 0.0


class SloController:
    def __init__(self, tpot_slo_s: float, ttft_slo_s: float, train_share: float, cost: SliceCostModel) -> None:
        self.tpot_slo_s = tpot_slo_s
        self.ttft_slo_s = ttft_slo_s
        self.train_share = train_share
        self.cost = cost
        self.counters = ControllerCounters()
        self.duty = min(train_share, 0.5)
        self.running = 0
        self.waiting = 0
        self.prefill_running = False  # set by the scheduler thread around a prefill forward
        self._recent_tpot: deque[float] = deque(maxlen=RECENT_DECODES)
        self._baseline_tpot: deque[float] = deque(maxlen=RECENT_DECODES)  # decode steps with no training
        self._training_busy = False  # the training thread is inside a grant (set by the worker)
        self._training_last_end = float("-inf")
        self._last_decode_end: float | None = None
        self._last_busy = float("-inf")  # when a request last ran or waited (scheduler thread's clock)
        self._prefill_since_decode = 0.0
        self._started = time.monotonic()
        self._lock = threading.Lock()

    # --- serving observations (scheduler thread) ------------------------------------------------

    def note_queues(self, running: int, waiting: int) -> None:
        self.running, self.waiting = running, waiting
        if running or waiting:
            self._last_busy = time.monotonic()

    def on_batch(self, is_decode: bool, started: float, seconds: float) -> None:
        with self._lock:
            self.counters.serving_seconds += seconds
            end = started + seconds
            self._last_busy = max(self._last_busy, end)
            if not is_decode:
                self._prefill_since_decode += seconds
                return
            if self._last_decode_end is not None:
                tpot = max(0.0, end - self._last_decode_end - self._prefill_since_decode)
                self._recent_tpot.append(tpot)
                self.counters.decode_steps += 1
                self.counters.decode_steps_within_slo += int(tpot <= self.tpot_slo_s)
                self.counters.worst_tpot_s = max(self.counters.worst_tpot_s, tpot)
                if not self._training_busy and self._training_last_end <= self._last_decode_end:
                    self._baseline_tpot.append(tpot)  # no training ran during this step
                self._adapt_duty(tpot)
            self._last_decode_end = end
            self._prefill_since_decode = 0.0

    def on_first_token(self, ttft_s: float) -> None:
        with self._lock:
            self.counters.first_tokens += 1
            self.counters.first_tokens_within_slo += int(ttft_s <= self.ttft_slo_s)
            self.counters.worst_ttft_s = max(self.counters.worst_ttft_s, ttft_s)

    def on_idle(self) -> None:
        """No request is running: the next decode step starts a new TPOT series."""
        self._last_decode_end = None
        self._prefill_since_decode = 0.0

    def tpot_limit_s(self) -> float:
        """The recent TPOT up to which training may run while requests decode (see the module doc)."""
        limit = self.tpot_slo_s * (1 - SAFETY_MARGIN)
        if self._baseline_tpot:
            baseline = sorted(self._baseline_tpot)[len(self._baseline_tpot) // 2]
            limit = max(baseline + HEADROOM_SHARE * (limit - baseline), baseline * (1 + TPOT_ALLOWANCE))
        return limit

    def _adapt_duty(self, tpot: float) -> None:
        if tpot > self.tpot_limit_s():
            self.duty = self.duty / 2 if self.duty / 2 >= MIN_DUTY else 0.0
        else:
            self.duty = min(self.train_share, self.duty + DUTY_STEP)

    # --- the training thread's activity (worker) ---------------------------------------------------

    def training_began(self) -> None:
        self._training_busy = True

    def training_ended(self) -> None:
        self._training_last_end = time.monotonic()
        self._training_busy = False

    def rest_after(self, grant: Grant, used_s: float) -> float:
        """Seconds to rest after a grant that ran for ``used_s``: a decode grant's slices may
        overrun its budget (a slice's length is a prediction), and the rest grows with them so
        that training's share of the time stays at the duty."""
        if grant.reason != "decode" or grant.budget_s <= 0:
            return grant.rest_s
        share = grant.budget_s / PERIOD_S
        return max(grant.rest_s, used_s * (1 - share) / share)

    # --- grants (training thread) ---------------------------------------------------------------

    def grant(self, has_work: bool, paused: bool) -> Grant:
        if paused:
            grant = Grant(0.0, "paused")
        elif not has_work:
            grant = Grant(0.0, "no_work")
        elif self.waiting > 0 or self.prefill_running:
            grant = Grant(0.0, "waiting_prefill")
        elif self.running > 0:
            budget = self.duty * PERIOD_S
            if budget <= 0:
                grant = Grant(0.0, "decode_held")  # training would push decoding past the limit
            else:
                grant = Grant(budget, "decode", min(SLICE_FRACTION * self.tpot_slo_s, budget), PERIOD_S - budget)
        else:
            idle_slice = min(IDLE_SLICE_CAP_S, IDLE_SLICE_FRACTION * self.ttft_slo_s)
            if time.monotonic() - self._last_busy < TRAFFIC_GAP_S:
                grant = Grant(PERIOD_S, "between_requests", min(BETWEEN_SLICE_CAP_S, idle_slice))
            else:
                grant = Grant(PERIOD_S, "idle", idle_slice)
        self.counters.grants[grant.reason] = self.counters.grants.get(grant.reason, 0) + 1
        return grant

    def still_granted(self, grant: Grant) -> bool:
        """Between two slices: is the situation the grant was given for still the same?"""
        if self.waiting > 0 or self.prefill_running:
            return False
        return (self.running > 0) == (grant.reason == "decode")

    def observe_slice(self, grant: Grant, kind: str, rows: int, context: int, seconds: float) -> None:
        self.cost.observe(kind, rows, context, seconds)
        with self._lock:
            self.counters.slices_run += 1
            self.counters.training_seconds += seconds
            self.counters.slices_by_grant[grant.reason] = self.counters.slices_by_grant.get(grant.reason, 0) + 1
            if grant.reason == "decode":
                self.counters.longest_decode_slice_s = max(self.counters.longest_decode_slice_s, seconds)

    def set_targets(self, tpot_slo_s: float | None = None, ttft_slo_s: float | None = None,
                    train_share: float | None = None) -> None:
        if tpot_slo_s is not None:
            self.tpot_slo_s = tpot_slo_s
        if ttft_slo_s is not None:
            self.ttft_slo_s = ttft_slo_s
        if train_share is not None:
            self.train_share = train_share
            self.duty = min(self.duty, train_share)

    # --- status -------------------------------------------------------------------------------

    def status(self) -> dict:
        c = self.counters
        wall = max(time.monotonic() - self._started, 1e-9)
        recent = sorted(self._recent_tpot)
        return {
            "tpot_slo_ms": self.tpot_slo_s * 1000,
            "ttft_slo_ms": self.ttft_slo_s * 1000,
            "train_share_cap": self.train_share,
            "decode_duty": self.duty,
            "decode_steps": c.decode_steps,
            "decode_steps_within_slo": c.decode_steps_within_slo,
            "slo_attainment": c.decode_steps_within_slo / c.decode_steps if c.decode_steps else None,
            "recent_tpot_p50_ms": recent[len(recent) // 2] * 1000 if recent else None,
            "tpot_limit_ms": self.tpot_limit_s() * 1000,
            "baseline_tpot_samples": len(self._baseline_tpot),
            "worst_tpot_ms": c.worst_tpot_s * 1000,
            "first_tokens": c.first_tokens,
            "first_tokens_within_slo": c.first_tokens_within_slo,
            "ttft_attainment": c.first_tokens_within_slo / c.first_tokens if c.first_tokens else None,
            "worst_ttft_ms": c.worst_ttft_s * 1000,
            "training_seconds": c.training_seconds,
            "serving_seconds": c.serving_seconds,
            "training_wall_share": c.training_seconds / wall,
            "slices_run": c.slices_run,
            "longest_decode_slice_ms": c.longest_decode_slice_s * 1000,
            "max_decode_slice_ms": SLICE_FRACTION * self.tpot_slo_s * 1000,
            "grants": dict(c.grants),
            "slices_by_grant": dict(c.slices_by_grant),
            "cost_model": self.cost.status(),
            "running": self.running,
            "waiting": self.waiting,
        }
