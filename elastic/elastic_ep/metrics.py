"""Scaling metrics, exported by every API server's /metrics beside vLLM's series.

With one API server they live in its registry; with several, the orchestrator runs in the launcher's
process, whose values reach every API server through prometheus-client's multiprocess directory.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_DURATION_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0]


class ScaleMetrics:
    def __init__(self, registry: CollectorRegistry | None, model_name: str, multiprocess: bool = False) -> None:
        labels = {"model_name": model_name}
        gauge_mode = {"multiprocess_mode": "mostrecent"} if multiprocess else {}
        self.size = Gauge("elastic:data_parallel_size", "Number of data-parallel (and expert-parallel) ranks.",
                          list(labels), registry=registry, **gauge_mode).labels(**labels)
        self.scaling = Gauge("elastic:scaling", "1 while a scale operation runs, else 0.", list(labels),
                             registry=registry, **gauge_mode).labels(**labels)
        self.scaling.set(0)
        self.operations = Counter("elastic:scale_operations", "Scale operations by direction and result.",
                                  [*labels, "direction", "result"], registry=registry)
        self.duration = Histogram("elastic:scale_duration_seconds", "Duration of scale operations by phase "
                                  "(prepare: beside serving; blocking: no rank served; total).",
                                  [*labels, "phase"], buckets=_DURATION_BUCKETS, registry=registry)
        self.labels = labels
        for phase in ("prepare", "blocking", "total"):  # present before the first scale, as the counters are
            self.duration.labels(**labels, phase=phase)
        for direction in ("up", "down"):  # every series exists from the start, for dashboards and alerts
            for result in ("succeeded", "rolled_back", "failed"):
                self.operations.labels(**labels, direction=direction, result=result)

    def set_scaling(self, running: bool) -> None:
        self.scaling.set(int(running))

    def set_size(self, size: int) -> None:
        self.size.set(size)

    def record(self, direction: str, result: str, prepare_s: float, blocking_s: float, total_s: float) -> None:
        if direction == "none":
            return
        self.operations.labels(**self.labels, direction=direction, result=result).inc()
        if result == "succeeded":
            for phase, seconds in (("prepare", prepare_s), ("blocking", blocking_s), ("total", total_s)):
                self.duration.labels(**self.labels, phase=phase).observe(seconds)
