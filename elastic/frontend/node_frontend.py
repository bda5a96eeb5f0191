"""The API server of a node other than the head (external or hybrid load balancing, docs/deployment.md).

Its engines run on this node and serve this API server only (ipc queues); the head runs the groups'
store, the DP coordinator and the scaling orchestrator. A NodeAgent registers this node's ranks with the
head, which orders the engines started; the API server is ready once each of them has registered here and
the membership names it active (a rank that joins a running group: after its scale-up committed).
"""
from __future__ import annotations

import time
from typing import Any

import msgspec
import zmq.asyncio

from elastic.cluster.engine_process import EngineStartupError
from elastic.cluster.node import NodeAgent
from elastic.protocol.from_engine import EngineReady
from elastic.protocol.scaling import ACTIVE

_START_TIMEOUT_S = 900.0  # weights may be loading; a join waits for the scale-up too


async def start_node_frontend(client: Any) -> NodeAgent:
    """`client`: the EngineCoreClient (bound already). Returns the registered, serving NodeAgent."""
    def on_lost(reason: str) -> None:
        for engine in list(client.engines):
            if client.is_local(engine.index):
                client._mark_dead(engine, f"was stopped: {reason}", root_cause=reason)

    agent = NodeAgent(client.config, frontend_input=client.input_address, frontend_output=client.output_address,
                      log_level=client._launcher_args["log_level"], on_engine_exit=client._on_launcher_exit,
                      on_membership=lambda u: client.apply_membership(u.membership, u.coordinator_frontend_pub),
                      on_lost=on_lost)
    client.node = agent
    await agent.start()
    if agent.membership is not None:  # the head's record, not the one our own -dp implies (a joiner is no member)
        client.apply_membership(agent.membership)
    inbox = zmq.asyncio.Socket.from_socket(client.input)
    decoder = msgspec.msgpack.Decoder(EngineReady)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not _serving(client, agent):
        if agent.lost is not None or agent.exited:
            raise EngineStartupError(agent.lost or "; ".join(f"engine core {i} {why} during start-up"
                                                             for i, why in agent.exited.items()))
        if time.monotonic() > deadline:
            raise EngineStartupError(f"this node's ranks did not start within {_START_TIMEOUT_S:.0f}s")
        if not await inbox.poll(100):
            continue
        identity, payload = await inbox.recv_multipart()
        try:
            ready = decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        client.register(identity, ready)
    return agent


def _serving(client: Any, agent: NodeAgent) -> bool:
    """Every engine this node started is registered here and an active member."""
    members = {e.index: e for e in client.engines}
    return bool(agent.spawned) and all(i in members and members[i].ready and members[i].state == ACTIVE
                                       for i in agent.spawned)
