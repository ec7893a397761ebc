"""The SLO controller: how much time training may take between two serving batches.

After every serving batch (and on every idle pass of the scheduler loop) the controller grants
the training lane a time budget; the lane runs slices (one layer of one sample's forward or
backward) while the *predicted* cost of the next slice fits in what is left of the budget.

Policy, in order:

1. **Paused or nothing to train** -> no budget.
2. **Waiting requests** (prefill not yet admitted) -> training yields: no budget. A waiting
   request's time to first token only grows while we train, and SGLang schedules prefill
   first whenever it can.
3. **Decoding requests** -> budget = ``tpot_target - predicted decode step - predicted prefill
   per gap - margin``: a running request's next token comes one decode step after this gap, and
   the prefill batches SGLang interleaves for arriving requests delay it too, so the gap plus
   those must stay under ``--alchemist-tpot-slo-ms``. When serving alone already fills the
   target (a loaded engine), training gets nothing and waits for idle time. It is also capped by the training share
   (``--alchemist-train-share``): every serving batch earns training a credit of
   ``share / (1 - share)`` times its duration, and slices run while serving spend it. The credit
   accumulates across batches (up to one TPOT target), because a slice cannot be split: a
   per-gap cap would starve a slice longer than one decode step forever, while the credit lets
   it run after a few steps and still bounds training's long-run share of serving time.
4. **Idle engine** -> a larger budget: ``IDLE_BUDGET_S`` per pass, at most
   ``TTFT_TRAINING_FRACTION`` of ``--alchemist-ttft-slo-ms``. The loop looks for new requests
   only between passes, so a request arriving during a pass waits for the rest of it: half the
   TTFT target is left for its queueing and prefill. Slices must fit the pass like any other,
   except the first one of a pass (an idle engine always makes progress, even on a slice larger
   than the budget). The engine counts as idle only after ``IDLE_GRACE_S`` without a batch: the
   short gaps between the requests of a continuous load are not idle time.

Costs are learned online: the decode step time is an exponential moving average of measured
decode batches, and a slice's cost is ``seconds per (token x layer)`` times its tokens,
averaged over measured slices (seeded from a matmul benchmark at start-up).

Accounting (``status()``): for every decode step, the time per output token it delivered is
the step's own duration plus the training time and scheduler overhead since the previous
decode step (serving's own prefill batches in between are not charged to training). SLO
attainment is the share of decode steps whose TPOT was within the target. For every request,
time to first token is counted in the scheduler from its entry into the waiting queue to the end
of the prefill batch that produced its first token, plus all the training that ran since the
scheduler last looked for requests before receiving it (an upper bound on the training delay it
suffered; the HTTP and tokenizer time before is not seen here). TTFT attainment is the share of
requests within ``--alchemist-ttft-slo-ms``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

IDLE_BUDGET_S = 0.25
IDLE_GRACE_S = 0.1
TTFT_TRAINING_FRACTION = 0.5  # of the TTFT target: the longest idle training pass
SAFETY_MARGIN = 0.1  # of the TPOT target, kept free for scheduler overhead and noise
SMOOTHING = 0.2


@dataclass
class Grant:
    budget_s: float
    reason: str  # "paused", "no_work", "waiting_prefill", "decode_slack", "idle_grace", "idle"


@dataclass
class ControllerCounters:
    decode_steps: int = 0
    decode_steps_within_slo: int = 0
    grants: dict = field(default_factory=dict)
    slices_by_grant: dict = field(default_factory=dict)  # slices run under each kind of grant
    training_seconds: float = 0.0
    serving_seconds: float = 0.0
    slices_run: int = 0
    slices_deferred: int = 0  # the next slice did not fit the budget: it waits for the next gap
    grants_used: int = 0
    slices_per_used_grant_total: int = 0
    max_slices_per_grant: int = 0
    worst_tpot_s: float = 0.0
    first_tokens: int = 0
    first_tokens_within_slo: int = 0
    worst_ttft_s: float = 0.0


class SloController:
    def __init__(self, tpot_slo_s: float, ttft_slo_s: float, train_share: float,
                 seconds_per_token_layer: float) -> None:
        self.tpot_slo_s = tpot_slo_s
        self.ttft_slo_s = ttft_slo_s
        self.train_share = train_share
        self.seconds_per_token_layer = seconds_per_token_layer
        self.decode_step_s: float | None = None
        self.prefill_per_gap_s = 0.0  # serving's own prefill time between two decode steps (average)
        self.counters = ControllerCounters()
        self._last_decode_end: float | None = None
        self._prefill_since_decode = 0.0
        self._share_credit_s = 0.0
        self._last_batch_end = float("-inf")
        self._started = time.monotonic()

    # --- serving observations --------------------------------------------------------------

    def on_batch(self, is_decode: bool, started: float, seconds: float) -> None:
        self.counters.serving_seconds += seconds
        if self.train_share < 1.0:
            earned = self.train_share / max(1e-6, 1 - self.train_share) * seconds
            self._share_credit_s = min(self._share_credit_s + earned, self.tpot_slo_s)
        end = started + seconds
        self._last_batch_end = end
        if not is_decode:
            self._prefill_since_decode += seconds
            return
        self.decode_step_s = seconds if self.decode_step_s is None else (
            (1 - SMOOTHING) * self.decode_step_s + SMOOTHING * seconds
        )
        if self._last_decode_end is not None:
            self.prefill_per_gap_s = (1 - SMOOTHING) * self.prefill_per_gap_s + SMOOTHING * self._prefill_since_decode
            gap = max(0.0, started - self._last_decode_end - self._prefill_since_decode)
            tpot = gap + seconds
            self.counters.decode_steps += 1
            self.counters.decode_steps_within_slo += int(tpot <= self.tpot_slo_s)
            self.counters.worst_tpot_s = max(self.counters.worst_tpot_s, tpot)
        self._last_decode_end = end
        self._prefill_since_decode = 0.0

    def on_first_token(self, ttft_s: float) -> None:
        self.counters.first_tokens += 1
        self.counters.first_tokens_within_slo += int(ttft_s <= self.ttft_slo_s)
        self.counters.worst_ttft_s = max(self.counters.worst_ttft_s, ttft_s)

    def on_idle(self) -> None:
        """No request is running: the next decode step starts a new TPOT series."""
        self._last_decode_end = None
        self._prefill_since_decode = 0.0

    # --- grants -----------------------------------------------------------------------------

    def grant(self, has_work: bool, paused: bool, running: int, waiting: int) -> Grant:
        if paused:
            grant = Grant(0.0, "paused")
        elif not has_work:
            grant = Grant(0.0, "no_work")
        elif waiting > 0:
            grant = Grant(0.0, "waiting_prefill")
        elif running > 0:
            decode = self.decode_step_s if self.decode_step_s is not None else self.tpot_slo_s
            slack = self.tpot_slo_s * (1 - SAFETY_MARGIN) - decode - self.prefill_per_gap_s
            share_cap = float("inf") if self.train_share >= 1.0 else self._share_credit_s
            grant = Grant(max(0.0, min(slack, share_cap)), "decode_slack")
        elif time.monotonic() - self._last_batch_end < IDLE_GRACE_S:
            grant = Grant(0.0, "idle_grace")
        else:
            grant = Grant(min(IDLE_BUDGET_S, TTFT_TRAINING_FRACTION * self.ttft_slo_s), "idle")
        self.counters.grants[grant.reason] = self.counters.grants.get(grant.reason, 0) + 1
        return grant

    def predicted_slice_s(self, tokens: int) -> float:
        return self.seconds_per_token_layer * max(tokens, 1)

    def observe_slice(self, tokens: int, seconds: float, while_serving: bool = True) -> None:
        """Learn the slice cost; a slice run while requests are served spends share credit."""
        if while_serving:
            self._share_credit_s -= seconds
        self.counters.slices_run += 1
        self.counters.training_seconds += seconds
        if tokens > 0 and seconds > 0:
            observed = seconds / tokens
            self.seconds_per_token_layer = (1 - SMOOTHING) * self.seconds_per_token_layer + SMOOTHING * observed

    def observe_grant_use(self, grant: Grant, slices: int, deferred: bool) -> None:
        if slices:
            self.counters.slices_by_grant[grant.reason] = self.counters.slices_by_grant.get(grant.reason, 0) + slices
            self.counters.grants_used += 1
            self.counters.slices_per_used_grant_total += slices
            self.counters.max_slices_per_grant = max(self.counters.max_slices_per_grant, slices)
        if deferred:
            self.counters.slices_deferred += 1

    def set_targets(self, tpot_slo_s: float | None = None, ttft_slo_s: float | None = None,
                    train_share: float | None = None) -> None:
        if tpot_slo_s is not None:
            self.tpot_slo_s = tpot_slo_s
        if ttft_slo_s is not None:
            self.ttft_slo_s = ttft_slo_s
        if train_share is not None:
            self.train_share = train_share

    # --- status -------------------------------------------------------------------------------

    def status(self) -> dict:
        c = self.counters
        wall = max(time.monotonic() - self._started, 1e-9)
        busy = c.training_seconds + c.serving_seconds
        return {
            "tpot_slo_ms": self.tpot_slo_s * 1000,
            "ttft_slo_ms": self.ttft_slo_s * 1000,
            "train_share_cap": self.train_share,
            "decode_steps": c.decode_steps,
            "decode_steps_within_slo": c.decode_steps_within_slo,
            "slo_attainment": c.decode_steps_within_slo / c.decode_steps if c.decode_steps else None,
            "worst_tpot_ms": c.worst_tpot_s * 1000,
            "first_tokens": c.first_tokens,
            "first_tokens_within_slo": c.first_tokens_within_slo,
            "ttft_attainment": c.first_tokens_within_slo / c.first_tokens if c.first_tokens else None,
            "worst_ttft_ms": c.worst_ttft_s * 1000,
            "predicted_decode_step_ms": None if self.decode_step_s is None else self.decode_step_s * 1000,
            "predicted_prefill_per_gap_ms": self.prefill_per_gap_s * 1000,
            "seconds_per_token_layer": self.seconds_per_token_layer,
            "training_seconds": c.training_seconds,
            "serving_seconds": c.serving_seconds,
            "training_time_share": c.training_seconds / busy if busy else 0.0,
            "training_wall_share": c.training_seconds / wall,
            "share_credit_ms": self._share_credit_s * 1000,
            "slices_run": c.slices_run,
            "slices_deferred": c.slices_deferred,
            "mean_slices_per_grant": c.slices_per_used_grant_total / c.grants_used if c.grants_used else 0.0,
            "max_slices_per_grant": c.max_slices_per_grant,
            "grants": dict(c.grants),
            "slices_by_grant": dict(c.slices_by_grant),
        }
