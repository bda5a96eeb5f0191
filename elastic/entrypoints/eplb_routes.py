"""EPLB for operators: `GET /eplb` (placement per layer, replica counts, balancedness, last rebalance) and
`POST /eplb/rebalance` (admin: re-place experts by the recorded load now; returns when done)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from elastic.entrypoints.middleware import admin_guard
from elastic.entrypoints.openai.protocol import APIError
from elastic.frontend.async_llm import AsyncLLM
from elastic.frontend.eplb_client import eplb_state, rebalance_experts

REBALANCE_TIMEOUT_S = 300.0


def eplb_router(engine: AsyncLLM, admin_api_key: str | None) -> APIRouter:
    router = APIRouter()

    def check_enabled() -> None:
        if not engine.config.eplb.enable_eplb:
            raise APIError(400, "EPLB is off: start the server with --enable-eplb")
        try:
            engine.check_ready()
        except Exception as e:  # not ready yet, or an engine is gone
            raise APIError(503, str(e)) from None

    async def rebalance() -> dict[str, Any]:
        check_enabled()
        try:
            return await rebalance_experts(engine.client, REBALANCE_TIMEOUT_S)
        except TimeoutError as e:
            raise APIError(504, str(e)) from None

    router.add_api_route("/eplb/rebalance", rebalance, methods=["POST"],
                         dependencies=[Depends(admin_guard(admin_api_key))])

    @router.get("/eplb")
    async def state() -> dict[str, Any]:
        check_enabled()
        return await eplb_state(engine.client)

    return router
