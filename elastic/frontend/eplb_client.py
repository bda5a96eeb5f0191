"""The operator's side of EPLB, for the HTTP routes and `LLM`: force a rebalance on every rank and wait for
it, or read the placement. Engines do the work (elastic/eplb/balancer.py); this only asks and waits."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from elastic.frontend.engine_client import EngineCoreClient

POLL_S = 0.05


def _live(client: EngineCoreClient) -> list[int]:
    return [e.index for e in client.engines if e.dead_reason is None]


async def eplb_state(client: EngineCoreClient) -> dict[str, Any]:
    """Placement per layer, replica counts and the figures of the last rebalance (the same on every rank)."""
    return await client.call_utility(_live(client)[0], "eplb_state")


async def rebalance_experts(client: EngineCoreClient, timeout_s: float = 300.0) -> dict[str, Any]:
    """Start a rebalance on every rank at the same step and wait until it is done (or found not worth it).
    Returns the new state with `seconds` (wall time of the call)."""
    started = time.monotonic()
    engines = _live(client)
    # One number for every rank: the next rebalance not yet started anywhere (ranks start them together).
    number = (await eplb_state(client))["started"] + 1
    await asyncio.gather(*(client.call_utility(i, "eplb_rebalance", number) for i in engines))
    while True:
        state = await eplb_state(client)
        stats = state["stats"]
        if stats["rebalances"] + stats["skipped"] >= number and not state["in_progress"]:
            return {**state, "seconds": time.monotonic() - started}
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"the rebalance did not finish within {timeout_s:.0f}s")
        await asyncio.sleep(POLL_S)
