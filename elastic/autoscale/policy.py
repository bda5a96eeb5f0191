"""The scaling decision: a pure function of a window of samples (no clock, no I/O), so it is tested on traces.

Scale up fast, down slowly, with hysteresis:

- **Up** when the server has been *hot* for `up_sustain_s` at its current size: in at least `up_hot_fraction`
  of the samples, requests queue (`up_waiting_per_rank` waiting per rank) or the fullest KV cache is above
  `up_kv_usage` (preemptions come next), or the window's TTFT / TPOT quantile is above its target. One sample
  is never enough: a burst that the batch absorbs at the next step must not add a rank. The target is what
  the queue needs (mean demand over what a rank ran while queueing), at least one more rank, at most
  `up_max_factor` times as many, and only `up_cooldown_s` after the last size change (the new ranks first
  take their share).
- **Down** by one rank when every sample of the last `down_quiet_s` was quiet: nothing waiting, KV usage
  under `down_kv_usage`, latency under `latency_down_fraction` of its targets, and the peak of running
  requests fits on one rank fewer at `down_utilization` of a rank's capacity (`capacity_per_rank`, or what a
  rank ran while requests queued in the window; unknown: only when idle), and not within `down_cooldown_s`
  of the last size change. Thresholds for down are well below those for up, so the two never alternate.
- `min_size` / `max_size` are hard bounds; nothing is decided while a scale runs, the server is unhealthy or
  the last scrape failed.

"The last size change" is read from the window itself: the current *segment* is the trailing run of samples
at the current size, and its length is the time spent at this size (a lower bound when the window is short,
which only makes the policy more patient, e.g. right after the autoscaler starts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from elastic.autoscale.signals import Sample, bucket_delta, histogram_quantile, observations

HOLD, UP, DOWN = "hold", "up", "down"
_MIN_LATENCY_OBSERVATIONS = 5  # fewer requests than this say nothing about a percentile
# What a rank ran while requests queued stays its capacity estimate this long (it is what lets a busy but
# shrinking load scale down before going idle); samples are small, so a long window costs little.
_CAPACITY_MEMORY_S = 1800.0


@dataclass(frozen=True)
class PolicyConfig:
    min_size: int = 1
    max_size: int = 1
    up_waiting_per_rank: float = 1.0  # queued requests per rank that count as queueing
    up_kv_usage: float = 0.9  # the fullest engine's KV cache above this is hot
    ttft_target_s: float | None = None  # TTFT quantile over the sustain window above this is hot
    tpot_target_s: float | None = None  # inter-token latency quantile, likewise
    latency_quantile: float = 0.9
    up_sustain_s: float = 20.0
    up_hot_fraction: float = 0.8
    up_cooldown_s: float = 30.0
    up_max_factor: float = 2.0
    down_quiet_s: float = 300.0
    down_cooldown_s: float = 600.0
    down_kv_usage: float = 0.6
    down_utilization: float = 0.5
    capacity_per_rank: float | None = None  # requests one rank runs at once (e.g. its --max-num-seqs)
    latency_down_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"need 1 <= min ({self.min_size}) <= max ({self.max_size})")
        for name in ("up_hot_fraction", "down_utilization", "latency_down_fraction", "latency_quantile"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not self.down_kv_usage < self.up_kv_usage:
            raise ValueError("down_kv_usage must be below up_kv_usage (hysteresis)")
        if self.up_max_factor <= 1 or self.up_waiting_per_rank <= 0:
            raise ValueError("up_max_factor must be > 1 and up_waiting_per_rank > 0")
        if min(self.up_sustain_s, self.up_cooldown_s, self.down_quiet_s, self.down_cooldown_s) < 0:
            raise ValueError("durations must not be negative")

    @property
    def window_s(self) -> float:
        """How much history `decide` can use (older samples change nothing)."""
        longest = max(self.up_sustain_s, self.up_cooldown_s, self.down_quiet_s, self.down_cooldown_s)
        return max(longest * 1.25 + 10, _CAPACITY_MEMORY_S)


@dataclass(frozen=True)
class Decision:
    action: str  # HOLD, UP or DOWN
    size: int  # ranks now
    target: int  # ranks wanted (== size on HOLD)
    code: str  # short reason id, stable across ticks (logging only when it changes)
    reason: str  # the reason in words, with the numbers

    @property
    def scales(self) -> bool:
        return self.action != HOLD

    def __str__(self) -> str:
        head = f"{self.action} {self.size} -> {self.target}" if self.scales else f"hold at {self.size}"
        return f"{head} [{self.code}]: {self.reason}"


def decide(window: Sequence[Sample], config: PolicyConfig) -> Decision:
    """The decision for the moment of the window's last sample (window: oldest first)."""
    if not window:
        return Decision(HOLD, 0, 0, "no-data", "no sample yet")
    last = window[-1]
    size = last.dp_size
    if not last.ok:
        return _hold(size, "no-metrics", "the last scrape failed; not deciding blind")
    if last.scaling:
        return _hold(size, "scaling", "a scale operation is running on the server")
    if not last.healthy:
        return _hold(size, "unhealthy", "/health is not 200 (starting, an engine died, or shutting down)")
    if size < config.min_size:
        return Decision(UP, size, config.min_size, "below-min", f"{size} ranks, below --min {config.min_size}")
    if size > config.max_size:
        return Decision(DOWN, size, config.max_size, "above-max", f"{size} ranks, above --max {config.max_size}")
    segment = current_segment(window)
    at_size_s = last.t - segment[0].t
    # A size change we saw starts the up cool-down; a size older than the window was set before we looked, so
    # its cool-down has passed (a scale-up held back for nothing costs more than one a little early).
    seen_change = segment[0] is not next(s for s in window if s.ok)
    up = _up(segment, config)
    if up is not None:
        return _gate_up(up, at_size_s if seen_change else math.inf, config) if up.scales else up
    return _down(window, segment, at_size_s, config)


def _gate_up(up: Decision, at_size_s: float, config: PolicyConfig) -> Decision:
    """`up` itself, or the hold that replaces it at --max or during the cool-down."""
    if up.size >= config.max_size:
        return _hold(up.size, "at-max", f"{up.reason}; already at --max {config.max_size}")
    if at_size_s < config.up_cooldown_s:
        return _hold(up.size, "up-cooldown", f"{up.reason}; at this size for {at_size_s:.0f}s of the "
                                             f"{config.up_cooldown_s:.0f}s cool-down")
    return up


def replay(samples: Sequence[Sample], config: PolicyConfig) -> list[tuple[float, Decision]]:
    """The decisions an autoscaler would have made on a recorded run. Like the controller, it makes none while
    its own scale is in flight: from a scale decision until a sample shows the size changed."""
    window: list[Sample] = []
    decisions: list[tuple[float, Decision]] = []
    pending: Decision | None = None
    for sample in samples:
        window.append(sample)
        while window[0].t < sample.t - config.window_s:
            window.pop(0)
        if pending is not None:
            if sample.ok and sample.dp_size == pending.size:
                continue  # still inside POST /scale
            pending = None
        decision = decide(window, config)
        decisions.append((sample.t, decision))
        pending = decision if decision.scales else None
    return decisions


def current_segment(window: Sequence[Sample]) -> list[Sample]:
    """The trailing samples at the last sample's size, with no scale in between (failed scrapes skipped:
    they say nothing, and under heavy load /metrics may time out exactly when it matters)."""
    size = window[-1].dp_size
    segment: list[Sample] = []
    for sample in reversed(window):
        if not sample.ok:
            continue
        if sample.dp_size != size or sample.scaling:
            break
        segment.append(sample)
    segment.reverse()
    return segment


def _since(samples: Sequence[Sample], seconds: float) -> tuple[list[Sample], bool]:
    """(the samples of the last `seconds`, whether the samples reach back that far)."""
    start = samples[-1].t - seconds
    recent = [s for s in samples if s.t >= start]
    return recent, samples[0].t <= start + 1e-9


_LATENCY_SERIES = (("ttft", "ttft", "ttft_target_s"), ("tpot", "itl", "tpot_target_s"))  # name, Sample field, target


def _latency(samples: Sequence[Sample], config: PolicyConfig) -> dict[str, float]:
    """Quantiles of TTFT and TPOT (seconds) over the samples' span, where it saw enough requests."""
    out = {}
    if len(samples) < 2:
        return out
    for name, attr, _ in _LATENCY_SERIES:
        delta = bucket_delta(getattr(samples[-1], attr), getattr(samples[0], attr))
        if observations(delta) >= _MIN_LATENCY_OBSERVATIONS:
            value = histogram_quantile(config.latency_quantile, delta)
            if value is not None:
                out[name] = value
    return out


def _targets(config: PolicyConfig) -> dict[str, float]:
    return {name: getattr(config, field) for name, _, field in _LATENCY_SERIES if getattr(config, field) is not None}


def _slow(segment: Sequence[Sample], i: int, config: PolicyConfig) -> bool:
    """Whether latency was over a target just before sample i: the quantile of the requests since the previous
    sample, reaching further back until enough requests are seen. Per sample, so latency must stay high for
    the sustain window like a queue must (one window-wide quantile would jump on a fresh 10% tail)."""
    for name, attr, field in _LATENCY_SERIES:
        target = getattr(config, field)
        if target is None:
            continue
        for j in range(i - 1, -1, -1):
            delta = bucket_delta(getattr(segment[i], attr), getattr(segment[j], attr))
            if observations(delta) >= _MIN_LATENCY_OBSERVATIONS:
                value = histogram_quantile(config.latency_quantile, delta)
                if value is not None and value > target:
                    return True
                break
    return False


def _queueing(s: Sample, config: PolicyConfig) -> bool:
    return s.waiting_per_rank >= config.up_waiting_per_rank


def _kv_full(s: Sample, config: PolicyConfig) -> bool:
    return s.kv_usage_max >= config.up_kv_usage


def _up(segment: list[Sample], config: PolicyConfig) -> Decision | None:
    """An UP decision (not yet checked against max and cool-down), a HOLD while heat builds up, or None."""
    last = segment[-1]
    recent, covered = _since(segment, config.up_sustain_s)
    first = len(segment) - len(recent)
    slow = [_slow(segment, first + k, config) for k in range(len(recent))]
    counts = {"queueing": sum(_queueing(s, config) for s in recent),
              "kv-cache": sum(_kv_full(s, config) for s in recent), "latency": sum(slow)}
    hot = sum(_queueing(s, config) or _kv_full(s, config) or x for s, x in zip(recent, slow))
    if not hot:
        return None
    latency, targets = _latency(recent, config), _targets(config)
    q = f"p{config.latency_quantile * 100:g}"
    what = (f"{_mean(recent, 'waiting_per_rank'):.1f} waiting/rank, {_mean(recent, 'running_per_rank'):.1f} "
            f"running/rank, KV max {max(s.kv_usage_max for s in recent):.0%}"
            + "".join(f", {q} {k.upper()} {v * 1000:.0f} ms (target {targets[k] * 1000:.0f})"
                      for k, v in latency.items() if k in targets))
    seen = f"hot in {hot} of {len(recent)} samples over {last.t - recent[0].t:.0f}s"
    if not (covered and hot >= config.up_hot_fraction * len(recent)):
        return _hold(last.dp_size, "up-pending", f"{seen} (needs {config.up_hot_fraction:.0%} over "
                                                 f"{config.up_sustain_s:.0f}s): {what}")
    code = max(counts, key=lambda k: counts[k])  # the main reason; ties go to the queue
    return Decision(UP, last.dp_size, _up_target(recent, latency, config), code, f"{seen}: {what}")


def _up_target(recent: list[Sample], latency: dict[str, float], config: PolicyConfig) -> int:
    size = recent[-1].dp_size
    wanted = size + 1
    capacity = max((s.running_per_rank for s in recent if _queueing(s, config)), default=0.0)
    if capacity > 0:  # while requests queue, a rank runs all it can: demand / that = the ranks needed
        demand = _mean(recent, "running") + _mean(recent, "waiting")
        wanted = max(wanted, math.ceil(demand / capacity - 1e-9))
    for name, target in _targets(config).items():  # latency roughly falls with the load per rank
        if latency.get(name, 0.0) > target:
            wanted = max(wanted, math.ceil(size * latency[name] / target - 1e-9))
    return max(size + 1, min(wanted, math.ceil(size * config.up_max_factor), config.max_size))


def _down(window: Sequence[Sample], segment: list[Sample], at_size_s: float, config: PolicyConfig) -> Decision:
    last = segment[-1]
    size = last.dp_size
    steady = (f"{last.waiting_per_rank:.1f} waiting/rank, {last.running_per_rank:.1f} running/rank, "
              f"KV max {last.kv_usage_max:.0%}")
    if size <= config.min_size:
        return _hold(size, "steady", f"{steady} (at --min {config.min_size})")
    run = _quiet_run(segment, config)
    if not run:
        return _hold(size, "steady", steady)
    recent = [s for s in run if s.t >= last.t - config.down_quiet_s]
    targets = _targets(config)
    busy = [k for k, v in _latency(recent, config).items()
            if v > config.latency_down_fraction * targets.get(k, math.inf)]
    if busy:
        return _hold(size, "steady", f"{steady}; {', '.join(b.upper() for b in busy)} above "
                                     f"{config.latency_down_fraction:.0%} of target")
    peak = max(s.running for s in recent)
    capacity = config.capacity_per_rank or learned_capacity(window, config)
    room = None if capacity is None else config.down_utilization * capacity * (size - 1)
    if (room is None and peak > 0) or (room is not None and peak > room):
        limit = "idle: capacity per rank unknown" if room is None else f"<= {room:.1f}"
        return _hold(size, "steady", f"{steady}; peak running {peak:.0f} would not fit {_ranks(size - 1)} ({limit})")
    quiet_s = last.t - run[0].t
    quiet = f"quiet: nothing waiting, peak running {peak:.0f}, KV max {max(s.kv_usage_max for s in recent):.0%}"
    if quiet_s < config.down_quiet_s:
        return _hold(size, "down-pending", f"{quiet} for {quiet_s:.0f}s of {config.down_quiet_s:.0f}s")
    if at_size_s < config.down_cooldown_s:
        return _hold(size, "down-cooldown", f"{quiet}; at this size for {at_size_s:.0f}s of the "
                                            f"{config.down_cooldown_s:.0f}s cool-down")
    return Decision(DOWN, size, size - 1, "quiet", f"{quiet} for {config.down_quiet_s:.0f}s")


def _quiet_run(segment: list[Sample], config: PolicyConfig) -> list[Sample]:
    """The trailing samples with nothing waiting and every KV cache under down_kv_usage."""
    run: list[Sample] = []
    for s in reversed(segment):
        if s.waiting > 0 or s.kv_usage_max > config.down_kv_usage:
            break
        run.append(s)
    run.reverse()
    return run


def learned_capacity(window: Sequence[Sample], config: PolicyConfig) -> float | None:
    """What one rank ran while requests queued (its batch was full), anywhere in the window."""
    full = [s.running_per_rank for s in window if s.ok and s.waiting_per_rank >= config.up_waiting_per_rank]
    return max(full) if full and max(full) > 0 else None


def _mean(samples: Sequence[Sample], attr: str) -> float:
    return sum(getattr(s, attr) for s in samples) / len(samples)


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _hold(size: int, code: str, reason: str) -> Decision:
    return Decision(HOLD, size, size, code, reason)
