"""`elastic serve --headless`: a node that runs engine ranks for a head on another machine, no API server.

    head node:      elastic serve MODEL -dp 4 --data-parallel-size-local 2 \\
                        --data-parallel-address 10.0.0.1 --data-parallel-rpc-port 13345
    headless node:  elastic serve MODEL --headless -dp 4 --data-parallel-size-local 2 \\
                        --data-parallel-start-rank 2 --data-parallel-address 10.0.0.1 --data-parallel-rpc-port 13345

The node registers with the head (NodeAgent), starts the engines the head orders, and serves until SIGTERM:
then it asks the head to shrink the group without its ranks (their requests move to the survivors) and
exits once its engines have; if the head refuses (only the highest ranks can leave) it stops them anyway.
It exits 1 when the head refuses it at start (a wrong key, ranks not free) or falls silent.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal

from elastic.cluster.node import NodeAgent, NodeRefused
from elastic.config import EngineConfig

logger = logging.getLogger(__name__)


def run_headless(config: EngineConfig, log_level: str = "INFO") -> int:
    multiprocessing.current_process().name = "HeadlessNode"
    return asyncio.run(_serve(config, log_level.upper()))


async def _serve(config: EngineConfig, log_level: str) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    lost: list[str] = []

    def on_lost(reason: str) -> None:
        lost.append(reason)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = NodeAgent(config, log_level=log_level, on_lost=on_lost)
    try:
        try:
            await agent.start()
        except NodeRefused as e:
            logger.error("%s", e)
            return 1
        logger.info("headless node serving rank(s) %s for the head at %s", agent.ranks, agent.head)
        await stop.wait()
        if lost:
            return 1
        await agent.shutdown()
        return 0
    finally:
        agent.close()
