"""Engines and front ends -> DP coordinator (one PULL socket, one tagged union)."""
from __future__ import annotations

from typing import Union

import msgspec


class EngineLoad(msgspec.Struct, array_like=True, tag=True):
    """An engine's queue lengths; sent when they change."""

    engine_index: int
    num_waiting: int
    num_running: int


class WaveComplete(msgspec.Struct, array_like=True, tag=True):
    """Rank 0: every rank finished its work; `wave` is over and the engines are paused."""

    wave: int


class StartWaveRequest(msgspec.Struct, array_like=True, tag=True):
    """A paused engine got a request: wake the other ranks into `wave` (it already runs)."""

    wave: int
    exclude_engine: int


class ScaleElasticEP(msgspec.Struct, array_like=True, tag=True):
    """The engine count changed (elastic scaling): resize the per-rank table. `epoch`: the membership
    epoch it belongs to, echoed in every LoadSnapshot so front ends never read a table of another size."""

    new_engine_count: int
    epoch: int = 0


CoordinatorInput = Union[EngineLoad, WaveComplete, StartWaveRequest, ScaleElasticEP]
