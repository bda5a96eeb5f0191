"""Where start-up time goes: a clock that records named phases and reports them in one log line.

Scale-up time is mostly a joining engine's start-up (spawn, imports, model, weights, graphs); one line per
engine with each phase's seconds shows which one to shorten.
"""
from __future__ import annotations

import os
import time


def process_age_s() -> float:
    """Seconds since this process was created (Linux /proc; 0.0 elsewhere): spawn + imports before main."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class PhaseClock:
    def __init__(self) -> None:
        self.started = self._last = time.perf_counter()
        self.phases: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        """The phase `name` ended now (it began at the previous mark)."""
        now = time.perf_counter()
        self.phases.append((name, now - self._last))
        self._last = now

    @property
    def total_s(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.phases)
