"""The OpenAI-compatible HTTP server: the FastAPI app, its lifespan (engine start and stop), `run_server`.

The HTTP port opens at once and answers 503 until the engine core is READY (load balancers and readiness
probes see a starting server, not a refused connection); an engine that fails to start stops the server
with exit code 1. A dead engine rank (or coordinator) is recovered by the server itself (elastic/fault/):
/health, the liveness, stays 200 meanwhile and GET /ready, the readiness, answers 503. A death nothing can
recover (a lone engine with --no-restart-failed-ranks) leaves the server answering 503.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import elastic
from elastic.config import EngineConfig
from elastic.config.server import ServerConfig
from elastic.entrypoints import middleware
from elastic.entrypoints.eplb_routes import eplb_router
from elastic.entrypoints.graceful import AFTER_DRAIN_GRACE_S, DrainingServer
from elastic.entrypoints.openai.offload import body_schema, offload, parse_body, validation_error
from elastic.entrypoints.openai.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                 TokenizeRequest, error_body)
from elastic.entrypoints.openai.serving import ServingContext, with_request_id
from elastic.entrypoints.openai.serving_chat import ChatHandler, render_chat
from elastic.entrypoints.openai.serving_completion import CompletionHandler
from elastic.entrypoints.scale_routes import make_scaler, scale_router
from elastic.fault.local import start_fault_recovery
from elastic.frontend.async_llm import AsyncLLM, EngineStartupError
from elastic.logger import warn_if_hub_kernels_active
from elastic.metrics import CONTENT_TYPE_LATEST, ServerMetrics

logger = logging.getLogger(__name__)


def build_app(engine: AsyncLLM, metrics: ServerMetrics, args: ServerConfig) -> FastAPI:
    ctx = ServingContext(engine, engine.config.model.served_model_name, args.trust_request_chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.exit_code = 0
        starter = asyncio.create_task(_start_engine(app, engine, args), name="engine-start")
        if engine.client.rejoin is not None:  # replacing an API server that died: listen once it serves
            await asyncio.wait([starter])
        try:
            yield
        finally:
            starter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starter
            if getattr(app.state, "supervisor", None) is not None:
                app.state.supervisor.close()  # exits from here on are the shutdown's
            await engine.shutdown()
            logger.info("engine stopped")

    app = FastAPI(title="elastic", version=elastic.__version__, lifespan=lifespan)
    app.state.exit_code = 0
    middleware.install(app, api_key=args.api_key, max_body_bytes=args.max_request_body_bytes)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        reason = engine.status()
        if reason is None:
            return Response(status_code=200)
        return JSONResponse(error_body(503, reason), status_code=503)

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: 200 when requests are served now; 503 while starting, recovering a failed rank (then
        /health, the liveness, stays 200: requests are accepted and wait) or shutting down."""
        reason = engine.readiness()
        if reason is None:
            return Response(status_code=200)
        return JSONResponse(error_body(503, reason), status_code=503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": elastic.__version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    _add_openai_routes(app, ctx)
    _add_tokenizer_routes(app, ctx)
    app.state.scaler, app.state.metrics = make_scaler(engine, metrics), metrics
    app.include_router(scale_router(app.state.scaler, args.admin_api_key))  # POST /scale, GET /scale
    app.include_router(eplb_router(engine, args.admin_api_key))  # GET /eplb, POST /eplb/rebalance
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is an OpenAI error body; a traceback goes to the log, never to the client."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error in request %s", middleware.current_request_id(), exc_info=exc)
        message = with_request_id("internal error while serving this request; the server log has the details")
        return JSONResponse(error_body(500, message), status_code=500)


def _add_openai_routes(app: FastAPI, ctx: ServingContext) -> None:
    """/v1: models, completions, chat. Bodies are parsed in the worker pool (see offload.py)."""
    completions, chat = CompletionHandler(ctx), ChatHandler(ctx)
    config, created = ctx.engine.config, int(time.time())

    def card() -> dict[str, Any]:
        return {"id": ctx.served_model_name, "object": "model", "created": created, "owned_by": "elastic",
                "root": config.model.model, "parent": None, "max_model_len": config.model.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != ctx.served_model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model")
        return card()

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def create_completion(raw: Request) -> Response:
        return await completions(await parse_body(raw, CompletionRequest), raw)

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
    async def create_chat_completion(raw: Request) -> Response:
        return await chat(await parse_body(raw, ChatCompletionRequest), raw)


def _add_tokenizer_routes(app: FastAPI, ctx: ServingContext) -> None:
    """vLLM's /tokenize and /detokenize; the work (templates, tokenizing, decoding) runs in the worker pool."""
    max_model_len = ctx.engine.config.model.max_model_len

    def tokenize_sync(req: TokenizeRequest) -> dict[str, Any]:
        tokenizer = ctx.require_tokenizer("prompt")
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            text = render_chat(ctx, req.messages, add_generation_prompt=bool(req.add_generation_prompt),
                               continue_final_message=bool(req.continue_final_message),
                               chat_template=req.chat_template, chat_template_kwargs=req.chat_template_kwargs)
            add_special = bool(req.add_special_tokens)  # None -> False: the template placed them
        else:
            text = req.prompt or ""
            add_special = req.add_special_tokens is not False
        try:
            ids = ctx.engine.input_processor.text_encoder.encode(text, add_special)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt" if req.messages is None else "messages") from None
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
                "token_strs": tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None}

    def detokenize_sync(req: DetokenizeRequest) -> dict[str, str]:
        tokenizer = ctx.require_tokenizer("tokens")
        vocab = ctx.engine.config.model.arch.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/tokenize", openapi_extra=body_schema(TokenizeRequest))
    async def tokenize(raw: Request) -> dict[str, Any]:
        req = await parse_body(raw, TokenizeRequest)
        ctx.check_model(req.model)
        return await offload(tokenize_sync, req)

    @app.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest))
    async def detokenize(raw: Request) -> dict[str, str]:
        req = await parse_body(raw, DetokenizeRequest)
        ctx.check_model(req.model)
        return await offload(detokenize_sync, req)


async def _start_engine(app: FastAPI, engine: AsyncLLM, args: ServerConfig) -> None:
    try:
        await engine.start()
    except asyncio.CancelledError:
        raise
    except EngineStartupError as e:
        logger.error("%s", e)
        _request_exit(app, 1)
        return
    except Exception:
        logger.exception("the engine failed to start")
        _request_exit(app, 1)
        return
    app.state.supervisor = start_fault_recovery(engine, app.state.scaler, app.state.metrics)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    port = getattr(app.state, "port", args.port)
    logger.info("ready: serving %r at http://%s:%d/v1 (metrics at /metrics)", engine.config.model.served_model_name,
                host, port)


def _request_exit(app: FastAPI, code: int) -> None:
    app.state.exit_code = code
    server = getattr(app.state, "server", None)
    if server is not None:
        server.should_exit = True


def _bind(host: str, port: int) -> socket.socket:
    """Bind before anything starts: a busy port is a clear error, not an orphaned engine."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_server(config: EngineConfig, args: ServerConfig) -> int:
    """Serve until SIGTERM / SIGINT (exit 0) or an engine start-up failure (exit 1)."""
    warn_if_hub_kernels_active(logger)
    metrics = ServerMetrics(config.model.served_model_name, config.model.max_model_len)
    try:
        engine = AsyncLLM(config, metrics=metrics, address=config.parallel.data_parallel_address,
                          handshake_port=config.parallel.data_parallel_rpc_port, log_level=args.log_level.upper())
    except ValueError as e:  # e.g. no loadable tokenizer
        logger.error("%s", e)
        return 1
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
    return serve_http(engine, metrics, args, sock)


def serve_http(engine: AsyncLLM, metrics: ServerMetrics, args: ServerConfig, sock: socket.socket) -> int:
    """Run uvicorn on the bound socket `sock` until shut down; returns the exit code."""
    import uvicorn

    app = build_app(engine, metrics, args)
    app.state.port = sock.getsockname()[1]
    server = DrainingServer(uvicorn.Config(
        app, log_config=None, log_level=args.log_level.lower(), access_log=args.access_log, loop="auto",
        timeout_keep_alive=5, timeout_graceful_shutdown=AFTER_DRAIN_GRACE_S), engine, args.shutdown_timeout)
    app.state.server = server
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown, then re-raises the signal under the handlers
    # found at start: make those no-ops, so a requested shutdown ends with exit code 0, not a traceback.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    logger.info("listening on %s:%d; starting the engine", args.host, app.state.port)
    try:
        server.run(sockets=[sock])
    finally:
        engine.client.close()  # whatever happened above, no engine process or socket file outlives us
        sock.close()
    return int(app.state.exit_code)
