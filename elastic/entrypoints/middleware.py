"""HTTP guards that sit in front of every route: request ids, the request-body limit, bearer tokens.

Plain ASGI (not BaseHTTPMiddleware), so streaming responses and disconnect detection pass through untouched.
"""
from __future__ import annotations

import contextvars
import re
import secrets
import uuid
from typing import Any, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elastic.entrypoints.openai.protocol import APIError, error_body

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # echoed into headers and logs: keep it tame
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request being served (also in its X-Request-Id response header)."""
    return _request_id.get()


class RequestIdMiddleware:
    """Every request gets an id: the client's X-Request-Id when it is a sane one, else a fresh one. It is
    echoed in the response header and named in server-side error messages and log lines, so a client's
    report can be matched to the log (which holds the traceback; the client never sees one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _CLIENT_REQUEST_ID.match(given) else uuid.uuid4().hex
        token = _request_id.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)


class BodyTooLargeError(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the server's limit of {limit} bytes "
                              "(--max-request-body-bytes)")


class BodySizeLimitMiddleware:
    """Refuses bodies over `limit` bytes with a 413: from Content-Length before reading anything, else as
    soon as the streamed body passes the limit (the handler reading it gets BodyTooLargeError, rendered as
    the 413). The rest of the body is read and dropped first (up to another `limit` bytes): a response sent
    while the client is still uploading is often lost to a connection reset."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _discard_body(receive, self.limit)
            err = BodyTooLargeError(self.limit)
            await JSONResponse(err.body(), status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    if message.get("more_body", False):
                        await _discard_body(receive, self.limit)
                    raise BodyTooLargeError(self.limit)
            return message

        await self.app(scope, counting_receive, send)


async def _discard_body(receive: Receive, budget: int) -> None:
    """Read and drop the rest of a request body, up to `budget` bytes (a larger one gets its connection cut)."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BearerToken:
    """One `Authorization: Bearer KEY` check, shared by the /v1 key and the admin key (constant time)."""

    def __init__(self, key: str) -> None:
        self.expected = f"Bearer {key}".encode()

    def accepts(self, authorization: bytes | str | None) -> bool:
        if isinstance(authorization, str):
            authorization = authorization.encode("latin-1", "replace")
        return secrets.compare_digest(authorization or b"", self.expected)


def _unauthorized(message: str) -> JSONResponse:
    return JSONResponse(error_body(401, message), status_code=401, headers={"WWW-Authenticate": "Bearer"})


class APIKeyMiddleware:
    """--api-key: a bearer token on every /v1 route (completions, chat, models, ...); health, metrics and the
    rest stay open for probes and scrapers."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.token = BearerToken(api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            if not self.token.accepts(dict(scope["headers"]).get(b"authorization")):
                response = _unauthorized("invalid or missing API key (Authorization: Bearer ...)")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def admin_guard(admin_api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency for admin routes (`dependencies=[Depends(admin_guard(key))]`): they need
    `Authorization: Bearer <--admin-api-key>`; without an admin key configured they are refused (403), so
    nobody can rescale or rebalance a server whose operator did not opt in."""
    token = BearerToken(admin_api_key) if admin_api_key else None

    async def check(request: Request) -> None:
        if token is None:
            raise APIError(403, "admin routes are disabled: start the server with --admin-api-key",
                           type="PermissionDeniedError")
        if not token.accepts(request.headers.get("authorization")):
            raise APIError(401, "invalid or missing admin API key (Authorization: Bearer ...)",
                           type="AuthenticationError")

    return check


def install(app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
    """Add the guards (the last added runs first: request ids wrap everything, so even a 401 carries one)."""
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodySizeLimitMiddleware, limit=max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
