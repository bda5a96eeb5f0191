"""docs/grafana-elastic.json plots every vllm:* and elastic:* series the server can export (a new metric must
get a panel), and is a dashboard Grafana can import."""
from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from elastic.elastic_ep.metrics import ScaleMetrics
from elastic.fault.metrics import FaultMetrics, RerunCounter
from elastic.metrics import ServerMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-elastic.json"
PLANNED = {"elastic:scaling"}  # plotted already; the server does not export it yet (docs/autoscaling.md)


def _expressions(dashboard: dict) -> str:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    return "\n".join(exprs)


def _server_families() -> set[str]:
    metrics = ServerMetrics("m", max_model_len=256)
    ScaleMetrics(metrics.registry, "m")
    FaultMetrics(metrics.registry, "m")
    RerunCounter(metrics.registry, "m")
    registry: CollectorRegistry = metrics.registry
    return {f.name for f in registry.collect() if f.name.startswith(("vllm:", "elastic:"))}


def test_every_series_has_a_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _expressions(dashboard)
    families = _server_families()
    assert len(families) > 20, families
    missing = sorted(name for name in families | PLANNED if name not in exprs)
    assert not missing, f"series without a panel in {DASHBOARD.name}: {missing}"


def test_dashboard_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
