"""What a training slice costs: one linear model per kind of slice, learned online from measured slices.

A slice's *work* is ``rows x (1 + context / ATTENTION_CONTEXT)``: its rows pass through the
projections (cost per row) and attend to ``context`` keys (cost per row and key). The constant
that converts keys into rows is the geometry's ratio of projection to attention FLOPs per row,
so ``work`` is proportional to FLOPs for any model. Per kind (target forward, prompt fill
forward, head, target backward, replay backward, replay of key rows, optimizer, publish, guard
decoding), seconds are modelled as ``overhead + rate x work`` and fitted by exponentially
weighted least squares, seeded from a matmul benchmark at start-up. The model answers two
questions:

- ``rows_for(kind, seconds, context)``: how many rows fit a slice of at most ``seconds`` (the
  planner that cuts training steps into slices, ``training/step.py``);
- ``predict``: the expected duration, whose error against the measurement is reported per kind
  (``status()["prediction_error"]``: mean absolute relative error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORGET = 0.9  # weight of the past in the running sums (about the last 10 slices dominate)
MIN_ROWS = 8  # below this a slice is all overhead


@dataclass
class _Fit:
    sum_w: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_xy: float = 0.0
    overhead: float = 0.0
    rate: float = 0.0  # seconds per unit of work
    observations: int = 0
    error_sum: float = 0.0
    error_count: int = 0

    def observe(self, work: float, seconds: float) -> None:
        for name in ("sum_w", "sum_x", "sum_y", "sum_xx", "sum_xy"):
            setattr(self, name, getattr(self, name) * FORGET)
        self.sum_w += 1
        self.sum_x += work
        self.sum_y += seconds
        self.sum_xx += work * work
        self.sum_xy += work * seconds
        self.observations += 1
        variance = self.sum_w * self.sum_xx - self.sum_x**2
        if variance > 1e-12 * max(self.sum_xx, 1.0) * self.sum_w:
            rate = (self.sum_w * self.sum_xy - self.sum_x * self.sum_y) / variance
            overhead = (self.sum_y - rate * self.sum_x) / self.sum_w
            if rate > 0 and overhead >= 0:
                self.rate, self.overhead = rate, overhead
                return
        # too little spread to separate the two: all cost is proportional to work
        if self.sum_x > 0:
            self.rate, self.overhead = self.sum_y / self.sum_x, 0.0


@dataclass
class SliceCostModel:
    attention_context: float  # keys per row that cost as much as the row's projections
    seed_rate: float  # seconds per unit of work before any slice is measured
    fits: dict[str, _Fit] = field(default_factory=dict)

    def work(self, rows: int, context: int) -> float:
        return max(rows, 1) * (1.0 + context / self.attention_context)

    def _fit(self, kind: str) -> _Fit:
        fit = self.fits.get(kind)
        if fit is None:
            fit = self.fits[kind] = _Fit(rate=self.seed_rate)
        return fit

    def predict(self, kind: str, rows: int, context: int) -> float:
        fit = self._fit(kind)
        return fit.overhead + fit.rate * self.work(rows, context)

    def observe(self, kind: str, rows: int, context: int, seconds: float) -> None:
        fit = self._fit(kind)
        if fit.observations:
            predicted = self.predict(kind, rows, context)
            fit.error_sum += abs(predicted - seconds) / max(seconds, 1e-6)
            fit.error_count += 1
        fit.observe(self.work(rows, context), seconds)

    def rows_for(self, kind: str, seconds: float, context: int, total: int) -> int:
        """Rows of ``total`` that a slice of ``kind`` can take within ``seconds``."""
        fit = self._fit(kind)
        per_row = fit.rate * (1.0 + context / self.attention_context)
        if per_row <= 0:
            return total
        rows = int((seconds - fit.overhead) / per_row)
        return max(min(total, MIN_ROWS), min(total, rows))

    def status(self) -> dict:
        return {
            kind: {
                "overhead_ms": fit.overhead * 1000,
                "ms_per_row": fit.rate * 1000,
                "slices": fit.observations,
                "prediction_error": fit.error_sum / fit.error_count if fit.error_count else None,
            }
            for kind, fit in sorted(self.fits.items())
        }


def attention_context(geometry) -> float:
    """Keys per row at which a row's attention FLOPs equal its projection FLOPs."""
    d, q, kv, inter = geometry.hidden_size, geometry.q_size, geometry.kv_size, geometry.intermediate_size
    projections = 2 * (d * (q + 2 * kv) + q * d + 3 * d * inter)
    attention_per_key = 4 * q
    return projections / attention_per_key
