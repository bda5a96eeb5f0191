"""Prometheus metrics under vLLM's names and labels, so dashboards, KEDA triggers and routers work unchanged.

Every series carries `model_name` and `engine` (the engine core index). The registry belongs to the API
server (no module-level state); with several API servers per host this moves to prometheus-client's
multiprocess mode so the numbers still add up.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector, generate_latest)

from elastic.protocol.from_engine import EplbStats, SchedulerStats

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

# vLLM's buckets, so histogram_quantile() over mixed fleets stays meaningful.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0]
_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0]


def _1_2_5_buckets(limit: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets)."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10 ** exponent
            if value > limit:
                return buckets
            buckets.append(value)
        exponent += 1


class _EngineSeries:
    """The labelled children of one engine (binding labels once keeps the hot path cheap)."""

    def __init__(self, m: ServerMetrics, labels: dict[str, str]) -> None:
        self.running = m.num_requests_running.labels(**labels)
        self.waiting = m.num_requests_waiting.labels(**labels)
        self.kv_usage = m.kv_cache_usage_perc.labels(**labels)
        self.preemptions = m.num_preemptions.labels(**labels)
        self.prompt_tokens = m.prompt_tokens.labels(**labels)
        self.generation_tokens = m.generation_tokens.labels(**labels)
        self.ttft = m.time_to_first_token.labels(**labels)
        self.itl = m.inter_token_latency.labels(**labels)
        self.e2e = m.e2e_request_latency.labels(**labels)
        self.queue_time = m.request_queue_time.labels(**labels)
        self.request_prompt_tokens = m.request_prompt_tokens.labels(**labels)
        self.request_generation_tokens = m.request_generation_tokens.labels(**labels)
        self.labels = labels
        self.last_preemptions = 0
        self.last_steps: dict[str, int] = {}  # by kind: the engine's cumulative counts last reported
        self.finish_reasons: set[str] = set()  # the request_success children that exist


class ServerMetrics:
    """One API server's metrics. With `multiprocess=True` (several API servers on one port) the values
    live in PROMETHEUS_MULTIPROC_DIR and `render()` merges every server's: counters and histograms add up,
    and the engine gauges (which every server hears alike) keep one value per engine ("mostrecent").
    Only the `primary` server counts engine-side counters (preemptions), so they are not multiplied."""

    def __init__(self, model_name: str, max_model_len: int, multiprocess: bool = False,
                 primary: bool = True) -> None:
        self.model_name = model_name
        self.multiprocess, self.primary = multiprocess, primary
        self.registry = CollectorRegistry()
        if not multiprocess:  # per-process collectors make no sense merged over processes
            for collector in (ProcessCollector, PlatformCollector, GCCollector):
                collector(registry=self.registry)
        labels = ["model_name", "engine"]
        r = self.registry
        gauge_mode = {"multiprocess_mode": "mostrecent"} if multiprocess else {}
        self.num_requests_running = Gauge("vllm:num_requests_running", "Number of requests in model execution "
                                          "batches.", labels, registry=r, **gauge_mode)
        self.num_requests_waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be "
                                          "processed.", labels, registry=r, **gauge_mode)
        self.kv_cache_usage_perc = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent "
                                         "usage.", labels, registry=r, **gauge_mode)
        self.num_preemptions = Counter("vllm:num_preemptions", "Cumulative number of preemptions from the "
                                       "engine.", labels, registry=r)
        self.engine_steps = Counter("elastic:engine_steps", "Forwards an engine ran, by kind: a decode CUDA "
                                    "graph, a mixed-step (prompt) graph, or eager.", labels + ["kind"], registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels,
                                     registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         labels, registry=r)
        self.request_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                       labels + ["finished_reason"], registry=r)
        self.time_to_first_token = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first "
                                             "token in seconds.", labels, buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token "
                                             "latency in seconds.", labels, buckets=_ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request "
                                             "latency in seconds.", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.request_queue_time = Histogram("vllm:request_queue_time_seconds", "Histogram of time spent in "
                                            "WAITING phase for request.", labels, buckets=_LATENCY_BUCKETS,
                                            registry=r)
        token_buckets = _1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens "
                                               "processed.", labels, buckets=token_buckets, registry=r)
        self.request_generation_tokens = Histogram("vllm:request_generation_tokens", "Number of generation "
                                                   "tokens processed.", labels, buckets=token_buckets, registry=r)
        self._engines: dict[int, _EngineSeries] = {}
        self.eplb = EplbMetrics(r, labels, gauge_mode)
        self._gone: set[str] = set()  # engine labels of engines that left (elastic scale-down)

    def engine(self, index: int) -> _EngineSeries:
        series = self._engines.get(index)
        if series is None:
            series = _EngineSeries(self, {"model_name": self.model_name, "engine": str(index)})
            self._engines[index] = series
        return series

    # ---- recorders, called by the front end's output loop ------------------------------------------------
    def record_scheduler_stats(self, engine: int, stats: SchedulerStats) -> None:
        s = self.engine(engine)
        s.running.set(stats.num_running)
        s.waiting.set(stats.num_waiting)
        s.kv_usage.set(stats.kv_cache_usage)
        if self.primary and stats.num_preemptions > s.last_preemptions:
            s.preemptions.inc(stats.num_preemptions - s.last_preemptions)
        s.last_preemptions = stats.num_preemptions
        for kind, count in (stats.steps_by_kind or {}).items():
            if self.primary and count > s.last_steps.get(kind, 0):
                self.engine_steps.labels(**s.labels, kind=kind).inc(count - s.last_steps.get(kind, 0))
            s.last_steps[kind] = count
        if stats.eplb is not None:
            self.eplb.record(s.labels, stats.eplb, count=self.primary)

    def record_engine_gone(self, engine: int) -> None:
        """A dead engine runs nothing: stale gauges would keep autoscalers and routers counting on it."""
        s = self.engine(engine)
        s.running.set(0)
        s.waiting.set(0)
        s.kv_usage.set(0)

    def remove_engine(self, engine: int) -> None:
        """An engine that left (elastic scale-down): its labelled series go, so nothing counts on it."""
        series = self._engines.pop(engine, None)
        if series is None:
            return
        self._gone.add(series.labels["engine"])  # multiprocess mode: the files keep it; render() drops it
        if self.multiprocess:  # prometheus-client cannot remove labels there
            return
        for metric in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage_perc,
                       self.num_preemptions, self.prompt_tokens, self.generation_tokens, self.time_to_first_token,
                       self.inter_token_latency, self.e2e_request_latency, self.request_queue_time,
                       self.request_prompt_tokens, self.request_generation_tokens):
            try:
                metric.remove(*series.labels.values())
            except KeyError:
                pass
        for reason in series.finish_reasons:
            self.request_success.remove(*series.labels.values(), reason)
        for kind in series.last_steps:
            self.engine_steps.remove(*series.labels.values(), kind)

    def record_queue_time(self, engine: int, seconds: float) -> None:
        self.engine(engine).queue_time.observe(seconds)

    def record_first_token(self, engine: int, ttft: float, num_prompt_tokens: int) -> None:
        s = self.engine(engine)
        s.ttft.observe(ttft)
        s.prompt_tokens.inc(num_prompt_tokens)

    def record_tokens(self, engine: int, num_tokens: int, inter_token_latency: float | None) -> None:
        s = self.engine(engine)
        s.generation_tokens.inc(num_tokens)
        if inter_token_latency is not None:
            s.itl.observe(inter_token_latency)

    def record_finished(self, engine: int, finish_reason: str, e2e: float, num_prompt_tokens: int,
                        num_generation_tokens: int) -> None:
        s = self.engine(engine)
        self.request_success.labels(**s.labels, finished_reason=finish_reason).inc()
        s.finish_reasons.add(finish_reason)
        s.e2e.observe(e2e)
        s.request_prompt_tokens.observe(num_prompt_tokens)
        s.request_generation_tokens.observe(num_generation_tokens)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        collector = multiprocess.MultiProcessCollector(None)
        merged.register(_WithoutEngines(collector, self._gone))
        return generate_latest(merged)


class _WithoutEngines:
    """A collector that drops the samples of engines that left (multiprocess values live on in files)."""

    def __init__(self, inner: Any, gone: set[str]) -> None:
        self.inner, self.gone = inner, gone

    def collect(self) -> Any:
        for family in self.inner.collect():
            family.samples = [x for x in family.samples if x.labels.get("engine") not in self.gone]
            yield family


class EplbMetrics:
    """elastic:eplb_* series, per engine (each rank reports the same rebalances; bytes are what it received)."""

    def __init__(self, registry: CollectorRegistry, labels: list[str], gauge_mode: dict[str, str]) -> None:
        r = registry
        self.balancedness = Gauge("elastic:eplb_balancedness", "Mean over max tokens per rank over the EPLB "
                                  "window, under the placement in force (1 is perfect).", labels, registry=r,
                                  **gauge_mode)
        self.rebalances = Counter("elastic:eplb_rebalances", "Completed expert rebalances.", labels, registry=r)
        self.seconds = Histogram("elastic:eplb_rebalance_seconds", "Wall time of one expert rebalance (all layers, "
                                 "while serving).", labels, registry=r,
                                 buckets=[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
        self.bytes_moved = Counter("elastic:eplb_bytes_moved", "Expert weight bytes received by this rank in "
                                   "rebalances.", labels, registry=r)
        self.stall = Gauge("elastic:eplb_step_stall_seconds", "Longest pause between two steps caused by a "
                           "rebalance so far.", labels, registry=r, **gauge_mode)
        self._last: dict[str, EplbStats] = {}

    def record(self, labels: dict[str, str], stats: EplbStats, count: bool) -> None:
        engine = labels["engine"]
        last = self._last.get(engine, EplbStats())
        if stats.balancedness is not None:
            self.balancedness.labels(**labels).set(stats.balancedness)
        self.stall.labels(**labels).set(stats.longest_stall_s)
        if count and stats.rebalances > last.rebalances:  # counters: only one API server adds them up
            self.rebalances.labels(**labels).inc(stats.rebalances - last.rebalances)
            self.seconds.labels(**labels).observe(stats.last_rebalance_s)
        if count and stats.bytes_moved > last.bytes_moved:
            self.bytes_moved.labels(**labels).inc(stats.bytes_moved - last.bytes_moved)
        self._last[engine] = stats
