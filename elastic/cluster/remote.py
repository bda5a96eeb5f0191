"""The head's view of engine ranks on other machines (headless nodes, external/hybrid-LB ranks).

Nodes register on the launcher's handshake port (protocol/nodes.py). The head claims the ranks a node
offers, orders one NodeSpawn per rank, and from then on learns each engine's exit from its node (or, when
the node falls silent past the heartbeat timeout, counts its engines as gone). A node offering the next
rank while the group runs asks to join: the head scales up by one with the new engine placed on that node
(the same POST /scale operation, with its deadlines and rollback); a node whose rank stops asks to leave,
and the group shrinks without it. Membership records are relayed to nodes that run an API server.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from elastic.protocol.nodes import (HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, NODE_IDENTITY_PREFIX, HeadToNode,
                                    NodeEngineExited, NodeHeartbeat, NodeHello, NodeLeave, NodeLeaveReply,
                                    NodeMembership, NodeSpawn, NodeStop, NodeToHead, NodeWelcome)
from elastic.protocol.scaling import MembershipUpdate

from elastic.config import ParallelConfig

# The launcher (EngineLauncher) and its EngineProcess records are typed Any here: launcher.py owns this object.
EngineLauncher = EngineProcess = Any
logger = logging.getLogger(__name__)

_MISSING_LOG_INTERVAL_S = 30.0
_JOIN_WAIT_S = 600.0  # a joining rank waits this long for its turn (ranks join one at a time, in order)


def new_node_identity() -> bytes:
    return NODE_IDENTITY_PREFIX + uuid.uuid4().hex[:12].encode()


@dataclass
class RemoteNode:
    identity: bytes
    hello: NodeHello
    engine_ids: set[int] = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return f"node {self.hello.node_id} ({self.hello.host}, pid {self.hello.pid})"

    @property
    def frontend(self) -> tuple[list[str], list[str]] | None:
        h = self.hello
        if h.frontend_input_address and h.frontend_output_address:
            return [h.frontend_input_address], [h.frontend_output_address]
        return None


class RemoteNodes:
    """Owned by the launcher: `start_engine` places an engine on a node when one offers its rank."""

    def __init__(self, launcher: EngineLauncher) -> None:
        self.launcher = launcher
        parallel = launcher.config.parallel
        self.local_ranks = parallel.local_ranks if parallel.is_head else range(0)
        self.nodes: dict[bytes, RemoteNode] = {}
        self.node_of: dict[int, RemoteNode] = {}  # engine id -> its node
        self.joins: dict[int, RemoteNode] = {}  # rank -> node offering it, waiting for its scale-up
        # Set by the owner of the scaling orchestrator (the API server): joins and leaves go through it.
        self.get_orchestrator: Callable[[], Any] | None = None
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(NodeToHead)
        self.tasks: set[asyncio.Task] = set()

    # ---- what the launcher asks -------------------------------------------------------------------------
    @staticmethod
    def handles(identity: bytes) -> bool:
        return identity.startswith(NODE_IDENTITY_PREFIX)

    def is_local(self, engine_id: int) -> bool:
        return engine_id in self.local_ranks  # initial engines: engine id == rank

    def expect(self, engine: EngineProcess) -> None:
        """An initial rank that a node will run: its exit is reported by that node."""
        engine.exited = asyncio.get_running_loop().create_future()

    def offers(self, rank: int) -> bool:
        """Whether a node offered to run rank `rank` (a scale-up then starts it there)."""
        return rank in self.joins

    def start_engine(self, engine: EngineProcess, parallel: ParallelConfig) -> bool:
        """Place an engine a scale-up starts on the node that offered its rank; False: start it locally."""
        node = self.joins.pop(parallel.data_parallel_rank, None)
        if node is None or node.identity not in self.nodes:
            return False
        engine.exited = asyncio.get_running_loop().create_future()
        self._bind(node, engine.index)
        self._send(node, NodeSpawn(engine.index, parallel.data_parallel_rank))
        logger.info("engine core %d (rank %d) placed on %s", engine.index, parallel.data_parallel_rank, node.name)
        return True

    def frontend_queues(self, engine_id: int) -> tuple[list[str], list[str]] | None:
        node = self.node_of.get(engine_id)
        return node.frontend if node is not None else None

    def is_remote(self, engine_id: int) -> bool:
        return engine_id in self.node_of

    def terminate(self, engine_id: int, kill: bool = False) -> bool:
        node = self.node_of.get(engine_id)
        if node is None:
            return False
        self._send(node, NodeStop([engine_id], kill))
        return True

    def publish(self, update: MembershipUpdate) -> None:
        for node in self.nodes.values():
            if node.frontend is not None:
                self._send(node, NodeMembership(update))

    def start(self) -> None:
        self._spawn_task(self._heartbeats(), "node-heartbeats")
        self._spawn_task(self._report_missing(), "node-wait")

    def close(self) -> None:
        for node in list(self.nodes.values()):
            if node.engine_ids:
                self._send(node, NodeStop(sorted(node.engine_ids), kill=False))
        for task in self.tasks:
            task.cancel()

    # ---- messages from nodes -----------------------------------------------------------------------------
    def handle(self, identity: bytes, payload: bytes) -> None:
        try:
            msg = self.decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            logger.error("dropping an undecodable message from a node: %s", e)
            return
        node = self.nodes.get(identity)
        if node is not None:
            node.last_seen = time.monotonic()
        if isinstance(msg, NodeHello):
            self._hello(identity, msg)
        elif node is None:
            logger.warning("ignoring %s from an unregistered node", type(msg).__name__)
        elif isinstance(msg, NodeEngineExited):
            self._engine_exited(msg.engine_id, msg.reason)
        elif isinstance(msg, NodeLeave):
            self._spawn_task(self._leave(node, msg), f"leave-{node.hello.node_id}")

    def _hello(self, identity: bytes, hello: NodeHello) -> None:
        node = RemoteNode(identity, hello)
        launcher = self.launcher
        size = launcher.membership.world_size
        initial = [r for r in hello.ranks if r in launcher.engines and r not in self.local_ranks
                   and r not in self.node_of and not launcher.engines[r].ready]
        if hello.ranks and initial == hello.ranks:  # ranks of the initial layout
            self.nodes[identity] = node
            self._send(node, NodeWelcome(True, world_size=size, membership=launcher.membership))
            for rank in hello.ranks:
                self._bind(node, rank)
                self._send(node, NodeSpawn(rank, rank))
            logger.info("%s runs rank(s) %s", node.name, hello.ranks)
            return
        ranks = hello.ranks
        if ranks and ranks[0] >= size and ranks == list(range(ranks[0], ranks[-1] + 1)) and launcher.handshake_address:
            self.nodes[identity] = node
            self._send(node, NodeWelcome(True, world_size=size, membership=launcher.membership))
            logger.info("%s asks to join as rank(s) %s (the group has %d)", node.name, ranks, size)
            self._spawn_task(self._join(node, ranks), f"join-{hello.node_id}")
            return
        error = (f"rank(s) {hello.ranks} are not free: the head runs {size} rank(s), this node may offer ranks "
                 f"of the starting layout that no node has claimed, or the next rank ({size}) to join")
        logger.error("refusing %s: %s", node.name, error)
        self._send(node, NodeWelcome(False, error))

    def _bind(self, node: RemoteNode, engine_id: int) -> None:
        node.engine_ids.add(engine_id)
        self.node_of[engine_id] = node

    def _engine_exited(self, engine_id: int, reason: str) -> None:
        node = self.node_of.pop(engine_id, None)
        if node is not None:
            node.engine_ids.discard(engine_id)
        engine = self.launcher.engines.get(engine_id)
        if engine is not None and engine.exit_reason is None:
            self.launcher.engine_exited(engine, reason)

    # ---- joining and leaving: scale operations -----------------------------------------------------------
    async def _join(self, node: RemoteNode, ranks: list[int]) -> None:
        """One scale-up to ranks[-1] + 1 with the new ranks placed on `node`, once the group has ranks[0]
        ranks (nodes join one after another, in rank order)."""
        deadline = time.monotonic() + _JOIN_WAIT_S
        while time.monotonic() < deadline and node.identity in self.nodes:
            orchestrator = self.get_orchestrator() if self.get_orchestrator is not None else None
            size = self.launcher.membership.world_size
            if orchestrator is not None and size == ranks[0] and orchestrator.status()["state"] == "idle":
                self.joins.update({rank: node for rank in ranks})
                result = await orchestrator.scale(ranks[-1] + 1, None, f"join-{node.hello.node_id}")
                for rank in ranks:
                    self.joins.pop(rank, None)
                logger.info("%s joining as rank(s) %s: %s%s", node.name, ranks, result["result"],
                            f" ({result['error']})" if result.get("error") else "")
                if result["result"] != "succeeded":
                    self._send(node, NodeWelcome(False, f"the scale-up failed: {result.get('error')}"))
                return
            if size > ranks[0]:
                break
            await asyncio.sleep(0.2)
        self._send(node, NodeWelcome(False, f"rank(s) {ranks} could not join (the group has "
                                            f"{self.launcher.membership.world_size} ranks)"))

    async def _leave(self, node: RemoteNode, msg: NodeLeave) -> None:
        reply = await self._try_leave(msg)
        logger.info("%s leaves: %s", node.name, reply.body.get("result") or reply.body.get("error"))
        self._send(node, reply)

    async def _try_leave(self, msg: NodeLeave) -> NodeLeaveReply:
        orchestrator = self.get_orchestrator() if self.get_orchestrator is not None else None
        if orchestrator is None:
            return NodeLeaveReply(503, {"error": "the head cannot scale now"})
        deadline = time.monotonic() + self.launcher.config.parallel.scale_phase_timeout
        while True:
            ranked = self.launcher.membership.ranked()
            leaving = [m for m in ranked if m.engine_id in msg.engine_ids]
            if not leaving:
                return NodeLeaveReply(200, {"result": "noop"})
            if {m.rank for m in leaving} != set(range(len(ranked) - len(leaving), len(ranked))):
                return NodeLeaveReply(409, {"error": "only the highest ranks can leave (the survivors keep ranks "
                                                     "0..M-1)"})
            try:
                result = await orchestrator.scale(len(ranked) - len(leaving), msg.drain_timeout,
                                                  f"leave-{'-'.join(map(str, msg.engine_ids))}")
                return NodeLeaveReply(200 if result["result"] != "failed" else 500, result)
            except Exception as e:  # the orchestrator's ScaleError carries the HTTP status
                status = getattr(e, "status", 500)
                if status != 409 or time.monotonic() > deadline:
                    return NodeLeaveReply(status, {"error": str(e)})
            await asyncio.sleep(0.2)

    async def _report_missing(self) -> None:
        """While ranks of the starting layout wait for a node to offer them, say which and where."""
        while True:
            await asyncio.sleep(_MISSING_LOG_INTERVAL_S)
            launcher = self.launcher
            missing = [i for i, e in launcher.engines.items() if not self.is_local(i) and i not in self.node_of
                       and not e.ready and e.exit_reason is None and i < launcher.membership.world_size]
            if not missing:
                return
            logger.info("waiting for a node to offer rank(s) %s: start it with --data-parallel-address and "
                        "--data-parallel-rpc-port pointing at %s", missing, launcher.handshake_address)

    # ---- liveness ------------------------------------------------------------------------------------------
    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            now = time.monotonic()
            for identity, node in list(self.nodes.items()):
                if now - node.last_seen <= HEARTBEAT_TIMEOUT_S:
                    self._send(node, NodeHeartbeat())
                    continue
                logger.error("%s has not answered for %.0f s: counting its engines as gone", node.name,
                             now - node.last_seen)
                del self.nodes[identity]
                for engine_id in sorted(node.engine_ids):
                    self._engine_exited(engine_id, f"was lost with its node {node.hello.host} (no heartbeat)")

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _send(self, node: RemoteNode, msg: HeadToNode) -> None:
        handshake = self.launcher.handshake
        if handshake is not None and not self.launcher.closed:
            handshake.send_multipart([node.identity, self.encoder.encode(msg)])

    def _spawn_task(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
