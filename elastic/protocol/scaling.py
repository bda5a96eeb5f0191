"""Elastic scaling messages: the parallel layout, the membership record, and the control channel.

Three channels carry them:
- launcher <-> engine: the handshake socket stays open after READY and becomes the control channel
  (PrepareScale / CommitScale / AbortScale down, ScalePrepared / ScaleCommitted up; dict-encoded, rare);
- launcher -> front ends: `MembershipUpdate` (in the same process as a call, else relayed on each API
  server's output queue beside EngineDead);
- API server -> the process that owns the launcher (with --api-server-count K): `ScaleRequest` /
  `StatusRequest` answered by `ScaleReply`.
Every message is msgspec; nothing is pickled.
"""
from __future__ import annotations

from typing import Any, Union

import msgspec


class ParallelLayout(msgspec.Struct, frozen=True):
    """Where one engine stands in the data/expert-parallel world at one epoch. Present at size 1 too, so a
    single engine can grow: epochs only increase (a failed scale also uses one up), and stateless groups
    of epoch e are named dp/e and ep/e on the launcher's TCPStore."""

    epoch: int
    world_size: int
    rank: int
    store_host: str = "127.0.0.1"
    store_port: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


# ---- membership: one record drives the launcher, every front end and the coordinator ------------------
ACTIVE, JOINING, LEAVING = "active", "joining", "leaving"


class Member(msgspec.Struct, array_like=True, frozen=True):
    engine_id: int  # stable for the process's life, the ZMQ identity and the `engine` metric label
    rank: int  # DP rank at this epoch (-1 while joining)
    state: str = ACTIVE  # active: routable; joining: not yet; leaving: no new requests, its requests move


class Membership(msgspec.Struct, array_like=True, frozen=True):
    epoch: int
    members: list[Member]

    def ranked(self) -> list[Member]:
        """The members that hold a DP rank at this epoch, in rank order."""
        return sorted((m for m in self.members if m.rank >= 0), key=lambda m: m.rank)

    @property
    def world_size(self) -> int:
        return len(self.ranked())

    def routable(self) -> list[int]:
        return [m.engine_id for m in self.ranked() if m.state == ACTIVE]


class MembershipUpdate(msgspec.Struct, array_like=True, tag=True):
    """To front ends: the new record, and the coordinator's front-end PUB once there is one (a 1 -> N
    scale starts the coordinator)."""

    membership: Membership
    coordinator_frontend_pub: str | None = None


# ---- front end <- engine: requests that leave a departing engine -------------------------------------
class MigratedRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """An engine that leaves handed this request back: the front end re-submits the prompt plus
    `output_token_ids` (every token it has already received for it, in order) to another engine. A seeded
    request carries its generator state, so its sampling continues exactly where it stopped."""

    request_id: str
    output_token_ids: list[int]
    generator_state: bytes | None = None


# ---- launcher -> engine (control channel) -------------------------------------------------------------
class CoordinatorLink(msgspec.Struct, array_like=True, frozen=True):
    input: str  # engines PUSH reports here
    engine_pub: str  # engines SUB here (START_DP_WAVE)


class JoinInfo(msgspec.Struct, frozen=True):
    """In the handshake of an engine started by a scale-up: build the model without reading the checkpoint,
    receive the non-expert weights from `weights_from` over the new groups, adopt `num_kv_blocks`."""

    op: str
    old_world_size: int
    weights_from: int  # rank that sends this engine the non-expert weights
    num_kv_blocks: int


class PrepareScale(msgspec.Struct, tag=True):
    """Phase 1, beside serving. `layout` None: this engine leaves (it stops taking requests and hands its
    requests back, after up to `drain_timeout_s` seconds of letting them finish). Otherwise build the groups
    of `layout` in the background and send the non-expert weights to the ranks in `send_weights_to`."""

    op: str
    old_world_size: int
    new_world_size: int
    layout: ParallelLayout | None
    send_weights_to: list[int] = []
    drain_timeout_s: float = 0.0
    coordinator: CoordinatorLink | None = None
    timeout_s: float = 60.0  # group rendezvous


class CommitScale(msgspec.Struct, tag=True):
    """Phase 2, blocking: every rank switches at the same step (agreed in the per-step DP exchange)."""

    op: str
    timeout_s: float = 30.0  # the new group's first collective; past it the old layout stays


class AbortScale(msgspec.Struct, tag=True):
    """Forget the prepared layout (its groups are destroyed) and serve on as before."""

    op: str


class RetireEngine(msgspec.Struct, tag=True):
    """To a rank that left: every front end has the new membership now; stop handing back requests, exit."""

    op: str


ControlToEngine = Union[PrepareScale, CommitScale, AbortScale, RetireEngine]


# ---- engine -> launcher (control channel) -------------------------------------------------------------
class ScalePrepared(msgspec.Struct, tag=True):
    engine_index: int  # the engine id (the handshake's field name)
    op: str
    error: str | None = None
    seconds: float = 0.0


class ScaleCommitted(msgspec.Struct, tag=True):
    engine_index: int
    op: str
    error: str | None = None
    blocking_s: float = 0.0  # this engine served nothing for this long
    rolled_back: bool = False  # the commit failed before anything changed: the old layout serves on
    free_memory_bytes: int | None = None  # (CUDA) after the switch: the next scale-down checks against it
    expert_slot_capacity: int | None = None  # and the expert slots per layer its storage holds


# ---- API server -> the launcher's process (several API servers) --------------------------------------
class ScaleRequest(msgspec.Struct, tag=True):
    new_data_parallel_size: int
    drain_timeout: float | None = None
    operation_id: str | None = None


class StatusRequest(msgspec.Struct, tag=True):
    pass


ScaleCall = Union[ScaleRequest, StatusRequest]


class ScaleReply(msgspec.Struct):
    status: int  # the HTTP status the API server answers with
    body: dict[str, Any]
