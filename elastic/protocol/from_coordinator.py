"""DP coordinator -> engines (START_DP_WAVE) and -> front ends (load snapshots)."""
from __future__ import annotations

from typing import Union

import msgspec


class StartDPWave(msgspec.Struct, array_like=True, tag=True):
    """Engines paused at `wave` (except `exclude_engine`, which woke first) start stepping."""

    wave: int
    exclude_engine: int


class CoordinatorHello(msgspec.Struct, array_like=True, tag=True):
    """Published when a subscriber joins: receiving it proves the subscription is live (PUB/SUB drops
    whatever is published before a subscriber is connected, the 'slow joiner' problem)."""


CoordinatorToEngine = Union[StartDPWave, CoordinatorHello]


class LoadSnapshot(msgspec.Struct, array_like=True, tag=True):
    """Per-engine [waiting, running] counts for routing, plus the wave state."""

    counts: list[list[int]]  # by DP rank
    wave: int
    running: bool
    epoch: int = 0  # of the membership the table is for (elastic scaling)
