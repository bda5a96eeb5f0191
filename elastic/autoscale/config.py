"""The autoscaler loop's settings, apart from the loop: `elastic --help` and `elastic serve` build the
`autoscale` subcommand's flags from these defaults without importing httpx (not a core dependency)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ControllerConfig:
    interval_s: float = 5.0  # between scrapes
    scrape_timeout_s: float = 10.0
    scale_timeout_s: float = 900.0  # one POST /scale; the server bounds each phase itself
    retry_s: float = 600.0  # how long one operation is retried (same id) after lost connections
    retry_delay_s: float = 1.0  # first wait before a retry (doubles, at most 30 s)
    failure_backoff_s: float = 60.0
    drain_timeout_s: float | None = None  # scale-down: seconds requests may finish on leaving ranks
    dry_run: bool = False
