"""The OpenAI-compatible HTTP server: the FastAPI app, its lifespan (engine start and stop), `run_server`.

The HTTP port opens at once and answers 503 until the engine core is READY (load balancers and readiness
probes see a starting server, not a refused connection); an engine that fails to start stops the server
with exit code 1. After an engine death the server stays up answering 503, so an orchestrator replaces it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import elastic
from elastic.config import EngineConfig
from elastic.config.server import ServerConfig
from elastic.entrypoints.openai.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                 TokenizeRequest, error_body)
from elastic.entrypoints.openai.serving import ServingContext
from elastic.entrypoints.openai.serving_chat import ChatHandler, render_chat
from elastic.entrypoints.openai.serving_completion import CompletionHandler
from elastic.frontend.async_llm import AsyncLLM, EngineStartupError
from elastic.logger import warn_if_hub_kernels_active
from elastic.metrics import CONTENT_TYPE_LATEST, ServerMetrics

logger = logging.getLogger(__name__)


class APIKeyMiddleware:
    """Bearer-token check for /v1/*; health, metrics and the rest stay open for probes and scrapers.
    Plain ASGI (not BaseHTTPMiddleware), so streaming and disconnect detection pass through untouched."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(auth, self.expected):
                response = JSONResponse(error_body(401, "invalid or missing API key (Authorization: Bearer ...)"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's error list -> one OpenAI-style 400 (never FastAPI's 422 body)."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"malformed JSON body: {detail}".rstrip(": "))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union members add their type names to the location; keep the field path only.
    fields = [p for p in loc if not (p.startswith(("list[", "str", "int", "function-", "tagged-union"))
                                     or p in ("str", "int", "float", "bool"))]
    param = ".".join(fields) or None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return APIError(400, message, param=fields[0] if fields else None)


def build_app(engine: AsyncLLM, metrics: ServerMetrics, args: ServerConfig) -> FastAPI:
    config = engine.config
    ctx = ServingContext(engine, config.model.served_model_name)
    completions, chat = CompletionHandler(ctx), ChatHandler(ctx)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.exit_code = 0
        starter = asyncio.create_task(_start_engine(app, engine, args), name="engine-start")
        try:
            yield
        finally:
            starter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starter
            await engine.shutdown()
            logger.info("engine stopped")

    app = FastAPI(title="elastic", version=elastic.__version__, lifespan=lifespan)
    app.state.exit_code = 0
    if args.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=args.api_key)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        reason = engine.status()
        if reason is None:
            return Response(status_code=200)
        return JSONResponse(error_body(503, reason), status_code=503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": elastic.__version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": ctx.served_model_name, "object": "model", "created": created, "owned_by": "elastic",
                "root": config.model.model, "parent": None, "max_model_len": config.model.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, raw: Request) -> Response:
        return await completions(req, raw)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, raw: Request) -> Response:
        return await chat(req, raw)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        ctx.check_model(req.model)
        tokenizer = ctx.require_tokenizer("prompt")
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            text = render_chat(ctx, req.messages, add_generation_prompt=bool(req.add_generation_prompt),
                               continue_final_message=bool(req.continue_final_message),
                               chat_template_kwargs=req.chat_template_kwargs)
            add_special = bool(req.add_special_tokens)  # None -> False: the template placed them
        else:
            text = req.prompt or ""
            add_special = req.add_special_tokens is not False
        ids = tokenizer.encode(text, add_special_tokens=add_special)
        return {"count": len(ids), "max_model_len": config.model.max_model_len, "tokens": ids,
                "token_strs": tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, str]:
        ctx.check_model(req.model)
        tokenizer = ctx.require_tokenizer("tokens")
        vocab = config.model.arch.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    return app


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
        engine = AsyncLLM(config, metrics=metrics, address=args.data_parallel_address,
                          handshake_port=args.data_parallel_rpc_port, log_level=args.log_level.upper())
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
    server = uvicorn.Server(uvicorn.Config(
        app, log_config=None, log_level=args.log_level.lower(), access_log=args.access_log, loop="auto",
        timeout_keep_alive=5, timeout_graceful_shutdown=int(max(1, args.shutdown_timeout))))
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
