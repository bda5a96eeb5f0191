"""A node's side of a multi-node deployment: register with the head, start the engines it orders, report.

Used by `elastic serve --headless` (engines only; they serve the head's API server) and by the API server
of an external- or hybrid-LB node (its engines serve it). The agent connects to the head's handshake port,
offers this node's ranks (NodeHello), starts one engine process per NodeSpawn (each then runs the usual
HELLO -> config -> READY handshake with the head), reports every engine exit at once, relays membership
records to its API server, and asks the head to shrink the group when this node's ranks leave.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import socket
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

import msgspec
import zmq
import zmq.asyncio

from elastic.cluster.devices import rank_device
from elastic.cluster.engine_process import EngineStartupError, describe_exit
from elastic.cluster.remote import new_node_identity
from elastic.config import EngineConfig
from elastic.engine.process import run_engine_core
from elastic.protocol.nodes import (HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, HeadToNode, NodeEngineExited,
                                    NodeHeartbeat, NodeHello, NodeLeave, NodeLeaveReply, NodeMembership, NodeSpawn,
                                    NodeStop, NodeWelcome)
from elastic.protocol.scaling import MembershipUpdate
from elastic.transport import security

logger = logging.getLogger(__name__)

_WELCOME_TIMEOUT_S = 120.0
_STOP_GRACE_S = 5.0


class NodeRefused(EngineStartupError):
    """The head refused this node (wrong key, ranks taken, or a join that failed)."""


def head_address(config: EngineConfig) -> str:
    p = config.parallel
    return f"tcp://{p.data_parallel_address}:{p.data_parallel_rpc_port}"


class NodeAgent:
    """`on_membership(update)`: a new membership record (nodes with an API server); `on_engine_exit(engine
    id, reason)`: one of our engines ended; `on_lost(reason)`: the head is gone or refused us after start."""

    def __init__(self, config: EngineConfig, *, frontend_input: str | None = None,
                 frontend_output: str | None = None, log_level: str = "INFO",
                 on_membership: Callable[[MembershipUpdate], None] | None = None,
                 on_engine_exit: Callable[[int, str], None] | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.config, self.log_level = config, log_level
        self.ranks = list(config.parallel.local_ranks)
        self.frontend_input, self.frontend_output = frontend_input, frontend_output
        self.on_membership, self.on_engine_exit, self.on_lost = on_membership, on_engine_exit, on_lost
        self.head = head_address(config)
        self.identity = new_node_identity()
        self.ctx = zmq.asyncio.Context()
        self.sock: Any = None
        self.procs: dict[int, BaseProcess] = {}  # engine id -> process
        self.slots: dict[int, int] = {}  # engine id -> local device slot
        self.death_writers: dict[int, Connection] = {}
        self.welcome: asyncio.Future | None = None
        self.leave_reply: asyncio.Future | None = None
        self.last_heard = time.monotonic()
        self.tasks: list[asyncio.Task] = []
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(HeadToNode)
        self.spawned: set[int] = set()  # every engine id this node was asked to start
        self.membership: Any = None  # the head's record when it welcomed us (protocol.scaling.Membership)
        self.exited: dict[int, str] = {}  # engine id -> how it ended
        self.lost: str | None = None
        self.closed = False

    @property
    def engine_ids(self) -> list[int]:
        return sorted(self.procs)

    async def start(self) -> None:
        """Register with the head; raises NodeRefused (wrong key, ranks not free) or on the deadline."""
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.identity)
        self.sock.setsockopt(zmq.LINGER, 1000)
        security.connect(self.sock, self.head)
        watch = security.HandshakeWatch(self.sock) if security.is_secured(self.sock) else None
        self.welcome = asyncio.get_running_loop().create_future()
        self.tasks.append(asyncio.get_running_loop().create_task(self._recv_loop(), name="node-recv"))
        self._send(NodeHello(self.identity.decode(), socket.gethostname(), os.getpid(), self.ranks,
                             self.frontend_input, self.frontend_output))
        logger.info("node %s: offering rank(s) %s to the head at %s", self.identity.decode(), self.ranks, self.head)
        deadline = time.monotonic() + _WELCOME_TIMEOUT_S
        try:
            while not self.welcome.done():
                if watch is not None and watch.refused():
                    raise NodeRefused(f"the head at {self.head} refused our connection: this node's data-parallel "
                                      f"key (fingerprint {security.key_fingerprint()}) differs from the head's")
                if time.monotonic() > deadline:
                    raise NodeRefused(f"no answer from the head at {self.head} within {_WELCOME_TIMEOUT_S:.0f}s")
                await asyncio.wait([self.welcome], timeout=0.2)
        finally:
            if watch is not None:
                watch.close()
        welcome: NodeWelcome = self.welcome.result()
        if not welcome.accepted:
            raise NodeRefused(f"the head refused this node: {welcome.error}")
        self.membership = welcome.membership
        self.tasks.append(asyncio.get_running_loop().create_task(self._heartbeats(), name="node-heartbeats"))

    # ---- from the head -------------------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            payload = await self.sock.recv()
            self.last_heard = time.monotonic()
            try:
                msg = self.decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.error("dropping an undecodable message from the head: %s", e)
                continue
            if isinstance(msg, NodeWelcome):
                if self.welcome is not None and not self.welcome.done():
                    self.welcome.set_result(msg)
                elif not msg.accepted:
                    self._lose(f"the head dropped this node: {msg.error}")
            elif isinstance(msg, NodeSpawn):
                self._spawn(msg.engine_id, msg.rank)
            elif isinstance(msg, NodeStop):
                for engine_id in msg.engine_ids:
                    self._stop(engine_id, msg.kill)
            elif isinstance(msg, NodeMembership):
                if self.on_membership is not None:
                    self.on_membership(msg.update)
            elif isinstance(msg, NodeLeaveReply):
                if self.leave_reply is not None and not self.leave_reply.done():
                    self.leave_reply.set_result(msg)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            self._send(NodeHeartbeat())
            silent = time.monotonic() - self.last_heard
            if silent > HEARTBEAT_TIMEOUT_S:
                self._lose(f"the head at {self.head} has not answered for {silent:.0f} s")
                return

    def _lose(self, reason: str) -> None:
        if self.lost is not None or self.closed:
            return
        self.lost = reason
        logger.error("%s; stopping this node's engines", reason)
        for engine_id in list(self.procs):
            self._stop(engine_id, kill=False)
        if self.on_lost is not None:
            self.on_lost(reason)

    # ---- engines ---------------------------------------------------------------------------------------------
    def _spawn(self, engine_id: int, rank: int) -> None:
        if engine_id in self.procs:
            return
        slot = min(set(range(len(self.slots) + 1)) - set(self.slots.values()))
        device = rank_device(self.config.device, slot, max(len(self.ranks), slot + 1))
        config = dataclasses.replace(self.config, model=dataclasses.replace(self.config.model, device=device))
        mp = multiprocessing.get_context("spawn")  # torch is not fork-safe
        reader, writer = mp.Pipe(duplex=False)
        proc = mp.Process(target=run_engine_core, name=f"EngineCore_{engine_id}",
                          args=(config, engine_id, self.head, reader, self.log_level, False, True))
        proc.start()
        reader.close()
        self.procs[engine_id], self.slots[engine_id], self.death_writers[engine_id] = proc, slot, writer
        self.spawned.add(engine_id)
        asyncio.get_running_loop().add_reader(proc.sentinel, self._on_exit, engine_id)
        logger.info("started engine core %d for rank %d on %s (pid %d)", engine_id, rank, device, proc.pid)

    def _on_exit(self, engine_id: int) -> None:
        proc = self.procs.pop(engine_id)
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        proc.join(1.0)
        self.slots.pop(engine_id, None)
        self.death_writers.pop(engine_id).close()
        reason = self.exited[engine_id] = describe_exit(proc.exitcode)
        logger.info("engine core %d %s", engine_id, reason)
        if not self.closed:
            self._send(NodeEngineExited(engine_id, reason))
            if self.on_engine_exit is not None:
                self.on_engine_exit(engine_id, reason)

    def _stop(self, engine_id: int, kill: bool) -> None:
        proc = self.procs.get(engine_id)
        if proc is None or not proc.is_alive():
            return
        proc.kill() if kill else proc.terminate()
        if not kill:
            asyncio.get_running_loop().call_later(_STOP_GRACE_S, lambda: proc.is_alive() and proc.kill())

    # ---- leaving ---------------------------------------------------------------------------------------------
    async def leave(self, drain_timeout: float = 0.0, timeout: float = 300.0) -> NodeLeaveReply:
        """Ask the head to shrink the group without this node's ranks; their engines then exit."""
        self.leave_reply = asyncio.get_running_loop().create_future()
        self._send(NodeLeave(self.engine_ids, drain_timeout))
        deadline = time.monotonic() + timeout
        # The head answers, or it stops our engines itself (it is shutting down), or it falls silent.
        while not self.leave_reply.done() and self.procs and self.lost is None and time.monotonic() < deadline:
            await asyncio.wait([self.leave_reply], timeout=0.1)
        if self.leave_reply.done():
            reply = self.leave_reply.result()
        elif not self.procs:
            reply = NodeLeaveReply(200, {"result": "stopped by the head"})
        else:
            reply = NodeLeaveReply(504, {"error": self.lost or f"the head did not answer within {timeout:g}s"})
        if reply.status != 200:
            logger.error("leaving the group failed (%d): %s", reply.status, reply.body.get("error"))
        return reply

    async def shutdown(self) -> None:
        """This node's ranks leave (SIGTERM to its API server): the head shrinks the group, they exit."""
        timeout = self.config.parallel.scale_phase_timeout
        if self.lost is None and self.procs:
            logger.info("asking the head to shrink the group without engine(s) %s", self.engine_ids)
            if (await self.leave(timeout=2 * timeout)).status == 200:
                await self.wait_engines_exited(timeout)

    async def wait_engines_exited(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.procs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _send(self, msg: Any) -> None:
        if self.sock is not None and not self.closed:
            self.sock.send(self.encoder.encode(msg))

    def close(self) -> None:
        """Idempotent: no engine process outlives it."""
        if self.closed:
            return
        self.closed = True
        for task in self.tasks:
            task.cancel()
        procs = list(self.procs.values())
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(_STOP_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
            try:
                asyncio.get_running_loop().remove_reader(proc.sentinel)
            except (RuntimeError, ValueError, OSError):
                pass
        for writer in self.death_writers.values():
            writer.close()
        if self.sock is not None:
            self.sock.close(linger=0)
        self.ctx.term()
