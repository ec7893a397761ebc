"""Training metrics in the Prometheus text format (``GET /v1/alchemist/metrics``, SGLang's ``/metrics``).

Built per scrape from the schedulers' status with ``prometheus_client``'s metric families, so
the numbers are exactly those of ``/v1/alchemist/status`` (one label ``dp_rank`` per scheduler).

With SGLang's ``--enable-metrics`` the same families also appear on SGLang's own ``/metrics``
(one scrape target). SGLang serves that route from a registry holding only its multiprocess
collector (``sglang.srt.utils.common.add_prometheus_middleware``, run in the HTTP process's
lifespan); an AFTER hook on that function (``plugin.py``) calls :func:`install_on_sglang_metrics`,
which serves ``/metrics`` from a registry with that same multiprocess collector plus
:class:`LiveMetrics`. A Prometheus collector is synchronous and cannot await the scheduler, so
``LiveMetrics`` serves a status snapshot that a background task refreshes every
``REFRESH_INTERVAL_S`` (``sglang_alchemist_metrics_age_seconds`` says how old it is).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "sglang_alchemist_"

# (metric name, kind, help, path into a scheduler's status)
METRICS = [
    ("optimizer_steps", "counter", "Optimizer steps taken", ("training", "optimizer_steps")),
    ("samples_trained", "counter", "Feedback samples trained", ("training", "samples_trained")),
    ("tokens_trained", "counter", "Target tokens trained", ("training", "tokens_trained")),
    ("samples_replayed", "counter", "Samples trained by replaying recorded activations", ("training", "samples_replayed")),
    ("samples_recomputed", "counter", "Samples trained by recomputation", ("training", "samples_recomputed")),
    ("recent_loss", "gauge", "Loss per target token of the last optimizer step", ("training", "recent_loss")),
    ("queue_depth", "gauge", "Feedback items waiting for training", ("training", "queue_depth")),
    ("adapter_version", "gauge", "Current adapter version of the trainer", ("versions", "current")),
    ("store_device_bytes", "gauge", "Recorded activation bytes in the device tier", ("store", "device_bytes")),
    ("store_host_bytes", "gauge", "Recorded activation bytes in the host tier", ("store", "host_bytes")),
    ("store_chunks_dropped", "counter", "Recorded chunks dropped for room", ("store", "chunks_dropped")),
    ("slo_attainment", "gauge", "Share of decode steps within the TPOT target", ("scheduler", "slo_attainment")),
    ("ttft_attainment", "gauge", "Share of requests whose first token came within the TTFT target",
     ("scheduler", "ttft_attainment")),
    ("training_time_share", "gauge", "Training share of busy engine time", ("scheduler", "training_time_share")),
    ("slices_deferred", "counter", "Training slices deferred to a later gap", ("scheduler", "slices_deferred")),
    ("micro_step_slices", "gauge", "Mean training slices run per used time grant", ("scheduler", "mean_slices_per_grant")),
    ("training_slices", "counter", "Training slices run", ("scheduler", "slices_run")),
    ("journal_queued", "gauge", "Journal records waiting for training", ("journal", "queued")),
    ("journal_trained", "counter", "Journal records trained", ("journal", "trained")),
    ("journal_dropped", "counter", "Journal records dropped", ("journal", "dropped")),
    ("journal_rejected", "counter", "Journal records whose update the publish gate rejected", ("journal", "rejected")),
    ("gate_checks", "counter", "Candidate versions checked by the publish gate", ("training", "gate", "checks")),
    ("gate_rejections", "counter", "Candidate versions the publish gate rejected", ("training", "gate", "rejections")),
]


class _Snapshot:
    def __init__(self, schedulers: list[dict], serving: dict) -> None:
        self.schedulers = schedulers
        self.serving = serving

    def collect(self):
        for name, kind, help_text, path in METRICS:
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(PREFIX + name, help_text, labels=["dp_rank"])
            for rank, status in enumerate(self.schedulers):
                value = status
                for key in path:
                    value = value.get(key) if isinstance(value, dict) else None
                if isinstance(value, int | float) and not isinstance(value, bool):
                    family.add_metric([str(rank)], float(value))
            yield family
        served = GaugeMetricFamily(PREFIX + "served_adapter_version", "Adapter version new requests get")
        served.add_metric([], float(self.serving["served_version"]))
        yield served
        replay = GaugeMetricFamily(PREFIX + "reuse_ratio", "Share of trained samples that replayed recorded activations")
        replayed = sum(s["training"]["samples_replayed"] for s in self.schedulers)
        trained = replayed + sum(s["training"]["samples_recomputed"] for s in self.schedulers)
        replay.add_metric([], replayed / trained if trained else 0.0)
        yield replay


class LiveMetrics:
    """A collector serving the last status snapshot (nothing before the first one)."""

    def __init__(self) -> None:
        self._snapshot: _Snapshot | None = None
        self._updated_at = 0.0

    def update(self, schedulers: list[dict], serving: dict) -> None:
        self._snapshot, self._updated_at = _Snapshot(schedulers, serving), time.monotonic()

    def collect(self):
        snapshot = self._snapshot
        if snapshot is None:
            return
        yield from snapshot.collect()
        age = GaugeMetricFamily(PREFIX + "metrics_age_seconds",
                                "Seconds since these training metrics were refreshed from the scheduler")
        age.add_metric([], time.monotonic() - self._updated_at)
        yield age


REFRESH_INTERVAL_S = 5.0


def install_on_sglang_metrics(app, collector: LiveMetrics) -> bool:
    """Serve SGLang's ``/metrics`` from its multiprocess collector plus ``collector``.

    Returns False (and changes nothing) if SGLang's ``/metrics`` route is not found.
    """
    from prometheus_client import make_asgi_app, multiprocess
    from starlette.routing import Mount

    for index, route in enumerate(app.router.routes):
        if isinstance(route, Mount) and route.path == "/metrics":
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(collector)
            replacement = Mount("/metrics", make_asgi_app(registry=registry))
            replacement.path_regex = route.path_regex  # SGLang's workaround for a 307 on /metrics
            app.router.routes[index] = replacement
            return True
    return False


def prometheus_text(schedulers: list[dict], serving: dict) -> bytes:
    registry = CollectorRegistry()
    registry.register(_Snapshot(schedulers, serving))
    return generate_latest(registry)
