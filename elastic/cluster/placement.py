"""Which object places the ranks a launcher does not start as local processes: nodes, or Ray actors."""
from __future__ import annotations

from typing import Any

from elastic.cluster.remote import RemoteNodes


def remote_ranks(launcher: Any) -> RemoteNodes:
    """The launcher's `remote`: RayRanks with --data-parallel-backend ray, else RemoteNodes (headless and
    external/hybrid-LB nodes)."""
    if launcher.config.parallel.data_parallel_backend == "ray":
        from elastic.cluster.ray_backend import RayRanks  # imports Ray only when asked for

        return RayRanks(launcher)
    return RemoteNodes(launcher)
