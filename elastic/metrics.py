"""Prometheus metrics under vLLM's names and labels, so dashboards, KEDA triggers and routers work unchanged.

Every series carries `model_name` and `engine` (the engine core index). The registry belongs to the API
server (no module-level state); with several API servers per host this moves to prometheus-client's
multiprocess mode so the numbers still add up.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector, generate_latest)

from elastic.protocol.from_engine import SchedulerStats

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

    def record_engine_gone(self, engine: int) -> None:
        """A dead engine runs nothing: stale gauges would keep autoscalers and routers counting on it."""
        s = self.engine(engine)
        s.running.set(0)
        s.waiting.set(0)
        s.kv_usage.set(0)

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
        s.e2e.observe(e2e)
        s.request_prompt_tokens.observe(num_prompt_tokens)
        s.request_generation_tokens.observe(num_generation_tokens)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)
