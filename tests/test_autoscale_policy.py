"""The autoscaling policy on traces (tests/autoscale_traces/*.json), and the metric parsing it relies on.

A trace is a list of samples, either recorded (`"samples"`: Sample.to_json dicts, e.g. from
benchmarks/autoscale_trace.py --record) or synthetic in a compact form (`"segments"`: runs of identical
samples every `interval_s`; `ttft_s` + `requests_per_s` add that many TTFT observations per second). Its
`expect` lists the scale decisions a replay must make, in order, with time bounds, and hold reasons that must
appear. Pure Python: the whole file runs in well under a second.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from elastic.autoscale.policy import HOLD, PolicyConfig, decide, replay
from elastic.autoscale.signals import Sample, bucket_delta, histogram_quantile, parse_sample

TRACES = sorted((Path(__file__).parent / "autoscale_traces").glob("*.json"))
_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, math.inf)  # synthetic TTFT buckets


def load_trace(path: Path) -> tuple[dict[str, Any], PolicyConfig, list[Sample]]:
    trace = json.loads(path.read_text())
    if "samples" in trace:
        samples = [Sample.from_json(s) for s in trace["samples"]]
    else:
        samples = _expand(trace["segments"], trace["interval_s"])
    return trace, PolicyConfig(**trace["config"]), samples


def _expand(segments: list[dict[str, Any]], interval: float) -> list[Sample]:
    samples, t = [], 0.0
    ttft = {_le(b): 0.0 for b in _BOUNDS}
    for seg in segments:
        fields = {k: v for k, v in seg.items() if k not in ("seconds", "ttft_s", "requests_per_s")}
        for _ in range(round(seg["seconds"] / interval)):
            if "ttft_s" in seg:  # this interval's requests, all at ttft_s
                for bound in _BOUNDS:
                    if seg["ttft_s"] <= bound:
                        ttft[_le(bound)] += seg["requests_per_s"] * interval
            samples.append(Sample(t=t, ttft=dict(ttft), **fields))
            t += interval
    return samples


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_trace(path: Path) -> None:
    trace, config, samples = load_trace(path)
    decisions = replay(samples, config)
    scales = [(t, d) for t, d in decisions if d.scales]
    expected = trace["expect"]["scales"]
    summary = [f"t={t:g} {d}" for t, d in scales]
    assert len(scales) == len(expected), f"{path.name}: scale decisions {summary}, expected {expected}"
    for (t, d), want in zip(scales, expected):
        assert (d.action, d.target) == (want["action"], want["target"]), summary
        assert want["at_least"] <= t <= want["at_most"], f"{path.name}: at t={t:g}, expected {want}: {summary}"
        assert d.code == want.get("code", d.code), summary
    codes = {d.code for _, d in decisions}
    missing = set(trace["expect"].get("holds_include", [])) - codes
    assert not missing, f"{path.name}: no hold for {missing}; reasons seen: {sorted(codes)}"
    _check_invariants(samples, decisions, config)


def _check_invariants(samples: list[Sample], decisions: list[tuple[float, Any]], config: PolicyConfig) -> None:
    by_time = {s.t: s for s in samples}
    for t, d in decisions:
        assert d.reason, "every decision says why"
        if not d.scales:
            assert d.target == d.size
            continue
        assert config.min_size <= d.target <= config.max_size, f"t={t:g}: {d} leaves [min, max]"
        assert not by_time[t].scaling, f"t={t:g}: {d} while an operation runs"
        if d.action == "down" and d.code != "above-max":
            assert d.target == d.size - 1, "scale down one rank at a time"


def test_replay_makes_no_decision_while_its_scale_is_in_flight() -> None:
    """The size changes 5 samples after the decision: those 5 ticks are the controller waiting on POST /scale."""
    config = PolicyConfig(max_size=3, up_sustain_s=2, up_cooldown_s=0)
    hot = [Sample(t=float(t), dp_size=1, running=4, waiting=8) for t in range(10)]
    decisions = replay(hot + [Sample(t=10.0, dp_size=2, running=8)], config)
    assert [t for t, d in decisions if d.scales] == [2.0]
    assert [t for t, _ in decisions] == [0.0, 1.0, 2.0, 10.0]


def test_holds_on_missing_or_bad_data() -> None:
    config = PolicyConfig(max_size=4, up_sustain_s=0, up_cooldown_s=0)
    hot = Sample(t=0.0, dp_size=1, running=4, waiting=8)
    assert decide([], config).code == "no-data"
    assert decide([hot, Sample(t=1.0, dp_size=1, ok=False)], config).code == "no-metrics"
    assert decide([hot, Sample(t=1.0, dp_size=1, healthy=False, waiting=8)], config).code == "unhealthy"
    assert decide([hot, Sample(t=1.0, dp_size=1, scaling=True, waiting=8)], config).code == "scaling"
    assert decide([hot], config).action == "up"


def test_failed_scrapes_do_not_reset_the_sustain_window() -> None:
    """Under heavy load /metrics may time out: a failed scrape in between keeps the queueing history."""
    config = PolicyConfig(max_size=2, up_sustain_s=4, up_cooldown_s=0)
    window = [Sample(t=float(t), dp_size=1, running=4, waiting=8) for t in range(5)]
    window[2] = Sample(t=2.0, dp_size=1, ok=False)
    assert decide(window, config).action == "up"


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="min"):
        PolicyConfig(min_size=3, max_size=2)
    with pytest.raises(ValueError, match="hysteresis"):
        PolicyConfig(up_kv_usage=0.5, down_kv_usage=0.6)


def test_histogram_quantile_matches_prometheus() -> None:
    # 10 observations: 5 <= 0.1, 4 in (0.1, 0.5], 1 in (0.5, +Inf)
    buckets = {"0.1": 5.0, "0.5": 9.0, "+Inf": 10.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.1 + 0.4 * 2 / 4)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.5)  # in +Inf: the largest finite bound
    assert histogram_quantile(0.9, {"0.1": 0.0, "+Inf": 0.0}) is None
    assert bucket_delta({"0.1": 7.0, "+Inf": 9.0}, {"0.1": 5.0, "+Inf": 6.0}) == {"0.1": 2.0, "+Inf": 3.0}
    assert bucket_delta({"0.1": 1.0, "+Inf": 1.0}, {"0.1": 5.0, "+Inf": 6.0}) == {"0.1": 1.0, "+Inf": 1.0}


def test_parse_sample_reads_the_servers_own_series() -> None:
    """The names and labels come from the server's real metrics registry, not from a copy of them."""
    from elastic.metrics import ServerMetrics

    metrics = ServerMetrics("m", max_model_len=256)
    for engine, (running, waiting, kv) in enumerate([(4, 3, 0.5), (2, 1, 0.75)]):
        series = metrics.engine(engine)
        series.running.set(running)
        series.waiting.set(waiting)
        series.kv_usage.set(kv)
        metrics.record_first_token(engine, 0.3, 10)
        metrics.record_tokens(engine, 5, 0.02)
    text = metrics.render().decode()
    sample = parse_sample(7.0, text, {"state": "preparing", "data_parallel_size": 2}, healthy=True)
    assert (sample.t, sample.dp_size, sample.scaling) == (7.0, 2, True)
    assert (sample.running, sample.waiting, sample.kv_usage_max) == (6.0, 4.0, 0.75)
    assert sample.generation_tokens == 10.0
    assert sample.ttft["+Inf"] == 2.0 and histogram_quantile(0.5, sample.ttft) == pytest.approx(0.25 + 0.25 * 0.5)
    assert sample.itl["0.025"] == 2.0
    # Without GET /scale: the size comes from the engines that report, and a round trip through JSON is exact.
    bare = parse_sample(8.0, text, None, healthy=False)
    assert (bare.dp_size, bare.scaling, bare.healthy) == (2, False, False)
    assert Sample.from_json(json.loads(json.dumps(sample.to_json()))) == sample
