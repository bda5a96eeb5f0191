"""Fault-recovery messages on the launcher <-> engine control channel (the handshake socket kept open).

    RecoverLayout  launcher -> survivor   a rank died: rebuild the groups over the survivors and restore the
                                          experts the dead rank held; answered with ScaleCommitted
    RankFault      engine -> launcher     a collective of this rank's step failed (a peer died or hung);
                                          the rank stops stepping, keeps its requests and waits for
                                          RecoverLayout
Heartbeats and the abort signal go through the launcher's TCPStore instead (elastic/fault/heartbeat.py):
they must work while an engine's main thread is blocked in a collective.
"""
from __future__ import annotations

import msgspec

from elastic.protocol.scaling import ParallelLayout


class RecoverLayout(msgspec.Struct, tag=True):
    """Switch to `layout` (a new epoch over the survivors). `survivors`: the survivors' ranks in the old
    layout, in new-rank order (survivors[r] was rank survivors[r] and becomes rank r); experts that only the
    dead ranks held are restored from surviving replicas, else from the checkpoint."""

    op: str
    layout: ParallelLayout
    old_world_size: int
    survivors: list[int]
    timeout_s: float = 30.0  # the new group's rendezvous and first collective


class RankFault(msgspec.Struct, tag=True):
    engine_index: int
    error: str
    epoch: int = 0  # of the layout whose collective failed (a report about an older one is stale)


# ---- keys on the launcher's TCPStore (it hosts the rendezvous of the ranks' groups) -------------------
HEARTBEAT_INTERVAL_S = 0.5  # an engine bumps its heartbeat counter this often, from a thread


def heartbeat_key(engine_id: int) -> str:
    return f"elastic/heartbeat/{engine_id}"


def abort_key(engine_id: int) -> str:
    """The launcher sets it to the membership epoch in which a peer of this engine failed: abort the
    collectives of that layout (a later one, after the recovery, is not affected)."""
    return f"elastic/abort/{engine_id}"
