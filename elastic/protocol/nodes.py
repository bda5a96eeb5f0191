"""Head <-> node messages: how engine ranks on other machines are started, watched and retired.

A node (a `--headless` process, or the API server of an external/hybrid-LB rank on another machine)
connects a DEALER to the head's handshake port (the same ROUTER its engines say HELLO on; identities that
start with NODE_IDENTITY_PREFIX are nodes, 4-byte ones are engines). The head answers NodeHello with
NodeWelcome, then orders NodeSpawn per rank; the node reports every engine exit at once and both sides
send heartbeats, so a silent node or head is noticed within the heartbeat timeout. Every message is
msgspec; nothing is pickled.
"""
from __future__ import annotations

from typing import Any, Union

import msgspec

from elastic.protocol.scaling import Membership, MembershipUpdate

NODE_IDENTITY_PREFIX = b"node-"
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 10.0  # silence after which the other side counts as gone


# ---- node -> head ------------------------------------------------------------------------------------
class NodeHello(msgspec.Struct, tag=True):
    """`ranks`: what this node runs; a rank at or past the running size asks to join (the group grows).
    `frontend_*`: the node's own API server queues (external/hybrid LB), where its engines connect; empty
    for a headless node (its engines serve the head's API server)."""

    node_id: str
    host: str
    pid: int
    ranks: list[int]
    frontend_input_address: str | None = None
    frontend_output_address: str | None = None


class NodeHeartbeat(msgspec.Struct, tag=True):
    pass


class NodeEngineExited(msgspec.Struct, tag=True):
    engine_id: int
    reason: str


class NodeLeave(msgspec.Struct, tag=True):
    """The node's rank is going away (SIGTERM to its API server): shrink the group without it."""

    engine_ids: list[int]
    drain_timeout: float = 0.0


NodeToHead = Union[NodeHello, NodeHeartbeat, NodeEngineExited, NodeLeave]


# ---- head -> node ------------------------------------------------------------------------------------
class NodeWelcome(msgspec.Struct, tag=True):
    """`membership`: the head's record now (a joining rank is not in it until its scale-up commits)."""

    accepted: bool
    error: str | None = None
    world_size: int = 0
    membership: Membership | None = None


class NodeSpawn(msgspec.Struct, tag=True):
    """Start an engine process with this engine id for this rank (it learns the rest in its handshake)."""

    engine_id: int
    rank: int


class NodeStop(msgspec.Struct, tag=True):
    engine_ids: list[int]
    kill: bool = False


class NodeMembership(msgspec.Struct, tag=True):
    """A membership record relayed to a node that runs an API server."""

    update: MembershipUpdate


class NodeLeaveReply(msgspec.Struct, tag=True):
    status: int  # as POST /scale would answer
    body: dict[str, Any]


HeadToNode = Union[NodeWelcome, NodeSpawn, NodeStop, NodeLeaveReply, NodeHeartbeat, NodeMembership]
