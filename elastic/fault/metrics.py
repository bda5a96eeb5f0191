"""Fault-recovery metrics, beside the scaling ones on every API server's /metrics.

With one API server they live in its registry. With several, the supervisor runs in their parent process;
`FaultMetrics.in_parent` writes there into prometheus-client's multiprocess directory, which every API
server's /metrics merges (the front ends count re-run requests themselves; counters add up)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_SECONDS_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0]
CAUSES = ("exit", "heartbeat", "collective", "coordinator")
RESULTS = ("succeeded", "failed")
PHASES = ("serving", "restored")  # serving again (at the survivors' size), back at the size before the failure


class FaultMetrics:
    def __init__(self, registry: CollectorRegistry | None, model_name: str) -> None:
        self.labels = {"model_name": model_name}
        names = list(self.labels)
        self.failures = Counter("elastic:rank_failures", "Processes found dead or hung (engine ranks and the DP "
                                "coordinator), by how they were found.", [*names, "cause"], registry=registry)
        self.recoveries = Counter("elastic:recoveries", "Recoveries from a failure, by result.",
                                  [*names, "result"], registry=registry)
        self.seconds = Histogram("elastic:recovery_seconds", "Seconds from a failure until serving again "
                                 "(phase=serving) and until back at the size before it (phase=restored).",
                                 [*names, "phase"], buckets=_SECONDS_BUCKETS, registry=registry)
        for cause in CAUSES:  # every series exists from the start, for dashboards and alerts
            self.failures.labels(**self.labels, cause=cause)
        for result in RESULTS:
            self.recoveries.labels(**self.labels, result=result)
        for phase in PHASES:
            self.seconds.labels(**self.labels, phase=phase)

    @classmethod
    def in_parent(cls, model_name: str) -> FaultMetrics:
        """For the parent of several API servers (PROMETHEUS_MULTIPROC_DIR is set): values go to files."""
        from prometheus_client import values

        values.ValueClass = values.MultiProcessValue()  # this process has no other metrics
        return cls(None, model_name)

    def failure(self, cause: str) -> None:
        self.failures.labels(**self.labels, cause=cause).inc()

    def recovery(self, succeeded: bool, seconds: float, phase: str = "serving") -> None:
        if phase == "serving":
            self.recoveries.labels(**self.labels, result="succeeded" if succeeded else "failed").inc()
        if succeeded:
            self.seconds.labels(**self.labels, phase=phase).observe(seconds)


class RerunCounter:
    """elastic:requests_rerun_total in an API server: engine requests re-submitted from what was streamed
    after their rank died."""

    def __init__(self, registry: CollectorRegistry | None, model_name: str) -> None:
        self.labels = {"model_name": model_name}
        self.counter = Counter("elastic:requests_rerun", "Requests re-run on another rank (prompt + tokens "
                               "streamed so far) after the rank serving them died.", list(self.labels),
                               registry=registry)
        self.counter.labels(**self.labels)

    def inc(self, n: int = 1) -> None:
        self.counter.labels(**self.labels).inc(n)
