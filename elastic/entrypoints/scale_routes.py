"""HTTP routes of elastic scaling (elastic/elastic_ep/): resize data/expert parallelism at run time.

    POST /scale {"new_data_parallel_size": N, "drain_timeout": s?, "operation_id": str?}
         -> 200 with the operation's timings once done (also when it rolled back: see "result"), 400 for an
            impossible size, 409 while a different operation runs, 401/403 without the admin key
    GET  /scale                     -> {state, data_parallel_size, target, operation_id, started_at, last}
    POST /scale_elastic_ep          vLLM's name for POST /scale
    POST /is_scaling_elastic_ep     vLLM's status call: {"is_scaling": bool, ...GET /scale}
Scaling needs --admin-api-key (the routes are refused without it); the status routes are open.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from elastic.elastic_ep.metrics import ScaleMetrics
from elastic.elastic_ep.operation import ScaleError
from elastic.elastic_ep.service import LocalScaler, RemoteScaler, Scaler
from elastic.entrypoints.middleware import admin_guard
from elastic.entrypoints.openai.protocol import error_body
from elastic.frontend.async_llm import AsyncLLM
from elastic.metrics import ServerMetrics
from elastic.protocol.scaling import ScaleRequest


def make_scaler(engine: AsyncLLM, metrics: ServerMetrics | None) -> Scaler:
    """In-process with one API server; forwarded to the launcher's process with several."""
    scale_metrics = None
    if metrics is not None:
        scale_metrics = ScaleMetrics(metrics.registry, metrics.model_name, multiprocess=metrics.multiprocess)
    frontend = engine.client.frontend
    if frontend is not None and frontend.scale_address:
        return RemoteScaler(frontend.scale_address, scale_metrics, engine.config.parallel.data_parallel_size)
    return LocalScaler(engine, scale_metrics)


async def _parse(request: Request) -> ScaleRequest:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as e:
        raise ScaleError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise ScaleError(400, "the body must be a JSON object")
    size = body.get("new_data_parallel_size")
    if isinstance(size, bool) or not isinstance(size, int):
        raise ScaleError(400, f"new_data_parallel_size must be an integer, got {size!r}")
    drain = body.get("drain_timeout")
    if drain is not None and (isinstance(drain, bool) or not isinstance(drain, (int, float))):
        raise ScaleError(400, f"drain_timeout must be a number of seconds, got {drain!r}")
    op_id = body.get("operation_id")
    if op_id is not None and (not isinstance(op_id, str) or not 0 < len(op_id) <= 128):
        raise ScaleError(400, "operation_id must be a string of 1 to 128 characters")
    return ScaleRequest(size, None if drain is None else float(drain), op_id)


def _error(status: int, message: str, status_body: Any = None) -> JSONResponse:
    body = error_body(status, message)
    if status_body is not None:
        body["status"] = status_body
    return JSONResponse(body, status_code=status)


def scale_router(scaler: Scaler, admin_api_key: str | None) -> APIRouter:
    router = APIRouter()
    guarded = [Depends(admin_guard(admin_api_key))]

    async def scale(request: Request) -> JSONResponse:
        try:
            call = await _parse(request)
        except ScaleError as e:
            return _error(e.status, str(e))
        status, body = await scaler.scale(call)
        if status != 200 and "error" in body:
            return _error(status, body["error"], body.get("status"))
        return JSONResponse(body, status_code=status)

    router.add_api_route("/scale", scale, methods=["POST"], dependencies=guarded)
    router.add_api_route("/scale_elastic_ep", scale, methods=["POST"], dependencies=guarded)

    @router.get("/scale")
    async def scale_status() -> JSONResponse:
        try:
            return JSONResponse(await scaler.status())
        except ScaleError as e:
            return _error(e.status, str(e))

    @router.post("/is_scaling_elastic_ep")
    async def is_scaling() -> JSONResponse:
        try:
            status = await scaler.status()
        except ScaleError as e:
            return _error(e.status, str(e))
        return JSONResponse({"is_scaling": status["state"] != "idle", **status})

    return router
