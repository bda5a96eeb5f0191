"""What the policy reads: one `Sample` per scrape of a server, summed over its engines.

A sample comes from three open routes: `/metrics` (vLLM's series: waiting and running requests and KV-cache
usage per engine, the TTFT and inter-token latency histograms, generated tokens), `GET /scale` (the data
parallel size and whether an operation runs: there is no `elastic:scaling` gauge yet) and `/health`.
Histograms are kept as cumulative bucket counts summed over engines, so a window's latency percentile is the
quantile of the difference between its last and first sample, as Prometheus' `histogram_quantile(rate(...))`.

Samples serialise to plain JSON, so a run can be recorded and the policy replayed on it (tests/autoscale_traces/).
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Mapping

Buckets = Mapping[str, float]  # histogram upper bound ("0.1", "+Inf") -> cumulative count

_WAITING = "vllm:num_requests_waiting"
_RUNNING = "vllm:num_requests_running"
_KV_USAGE = "vllm:kv_cache_usage_perc"
_TTFT_BUCKET = "vllm:time_to_first_token_seconds_bucket"
_ITL_BUCKET = "vllm:inter_token_latency_seconds_bucket"
_GENERATION_TOKENS = "vllm:generation_tokens_total"
_DP_SIZE = "elastic:data_parallel_size"
_SCALING = "elastic:scaling"  # not exported yet (see docs/autoscaling.md); used when it appears


@dataclass(frozen=True)
class Sample:
    """The server at one moment. `t` is seconds on the scraper's monotonic clock (a trace's own origin)."""

    t: float
    dp_size: int
    scaling: bool = False  # a scale operation is running
    healthy: bool = True  # /health answered 200
    ok: bool = True  # False: the scrape failed (unreachable, or an unexpected answer)
    waiting: float = 0.0  # requests queued, all engines
    running: float = 0.0  # requests in the running batches, all engines
    kv_usage_max: float = 0.0  # the fullest engine's KV cache, 0..1
    ttft: Buckets = field(default_factory=dict)  # time to first token, seconds
    itl: Buckets = field(default_factory=dict)  # inter-token latency (TPOT), seconds
    generation_tokens: float = 0.0  # cumulative

    @property
    def running_per_rank(self) -> float:
        return self.running / max(self.dp_size, 1)

    @property
    def waiting_per_rank(self) -> float:
        return self.waiting / max(self.dp_size, 1)

    def to_json(self) -> dict[str, Any]:
        """Fields that differ from their defaults (a trace stays small and readable)."""
        defaults = {f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
                    for f in fields(self) if f.default is not MISSING or f.default_factory is not MISSING}
        return {k: v for k, v in asdict(self).items() if k not in defaults or v != defaults[k]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sample:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def failed_sample(t: float, dp_size: int) -> Sample:
    """A scrape that got no usable answer: the policy holds on it."""
    return Sample(t=t, dp_size=dp_size, ok=False, healthy=False)


def parse_sample(t: float, metrics_text: str, scale_status: Mapping[str, Any] | None, healthy: bool) -> Sample:
    """One Sample from the /metrics text, the GET /scale body (None if unavailable) and /health."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    kv_max = 0.0
    engines: set[str] = set()
    ttft: dict[str, float] = {}
    itl: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name in (_WAITING, _RUNNING, _GENERATION_TOKENS, _DP_SIZE, _SCALING):
                sums[s.name] = sums.get(s.name, 0.0) + s.value
                if s.name == _RUNNING:
                    engines.add(s.labels.get("engine", ""))
            elif s.name == _KV_USAGE:
                kv_max = max(kv_max, s.value)
            elif s.name in (_TTFT_BUCKET, _ITL_BUCKET):
                target = ttft if s.name == _TTFT_BUCKET else itl
                le = _le_key(s.labels["le"])
                target[le] = target.get(le, 0.0) + s.value
    dp_size = int(sums.get(_DP_SIZE, len(engines) or 1))
    scaling = sums.get(_SCALING, 0.0) > 0
    if scale_status is not None:  # the status route is the authority: it is the orchestrator's own state
        dp_size = int(scale_status.get("data_parallel_size", dp_size))
        scaling = scaling or scale_status.get("state", "idle") != "idle"
    return Sample(t=t, dp_size=dp_size, scaling=scaling, healthy=healthy, waiting=sums.get(_WAITING, 0.0),
                  running=sums.get(_RUNNING, 0.0), kv_usage_max=kv_max, ttft=ttft, itl=itl,
                  generation_tokens=sums.get(_GENERATION_TOKENS, 0.0))


def _le_key(le: str) -> str:
    """One spelling per bound ("1", "1.0" and "+Inf" as Prometheus writes them)."""
    value = float(le)
    return "+Inf" if math.isinf(value) else repr(value)


def bucket_delta(newer: Buckets, older: Buckets) -> dict[str, float]:
    """Observations between two samples. A count that went down means series were reset or removed (an
    engine left): then the newer counts are the best we have."""
    if any(newer.get(le, 0.0) < count for le, count in older.items()):
        return dict(newer)
    return {le: count - older.get(le, 0.0) for le, count in newer.items()}


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets; None without observations."""
    pairs = sorted((float(le), count) for le, count in buckets.items())
    if not pairs or pairs[-1][1] <= 0:
        return None
    rank = q * pairs[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in pairs:
        if count >= rank:
            if math.isinf(upper):  # past the largest finite bound: that bound is all we know
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def observations(buckets: Buckets) -> float:
    return max(buckets.values(), default=0.0)
