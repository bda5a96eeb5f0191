"""Wiring of fault recovery into one API server process (the parent of several does its own, in
entrypoints/multi_server.py)."""
from __future__ import annotations

from typing import Any

from elastic.elastic_ep.service import LocalScaler
from elastic.fault.metrics import FaultMetrics, RerunCounter
from elastic.fault.supervisor import FaultSupervisor
from elastic.frontend.async_llm import AsyncLLM
from elastic.metrics import ServerMetrics


def start_fault_recovery(engine: AsyncLLM, scaler: Any, metrics: ServerMetrics | None) -> FaultSupervisor | None:
    """After the engines started. Owning them (one API server): a supervisor beside the launcher, to which
    the engine client reports every death. Attached (one of several): the parent supervises; this front end
    only re-runs the requests of a dead rank. Either way re-runs are counted here."""
    client = engine.client
    if metrics is not None:
        engine.on_rerun = RerunCounter(metrics.registry, metrics.model_name).inc
    client.recovers = True
    if client.launcher is None or not isinstance(scaler, LocalScaler):
        return None
    orchestrator = scaler.orchestrator()
    if orchestrator is None:
        return None
    fault_metrics = FaultMetrics(metrics.registry, metrics.model_name) if metrics is not None else None
    supervisor = FaultSupervisor(client.launcher, orchestrator, engine.config, fault_metrics)
    client.fault_handler = supervisor.rank_failed
    return supervisor
