"""Heavy request work off the event loop: body parsing, tokenization, chat templates, long detokenization.

The event loop serves every connection (health probes, streams, engine outputs), so anything whose cost
grows with what a client sends runs in a small thread pool instead. Tokenizers release the GIL while they
encode; pydantic and Jinja hold it but yield it to the loop every few milliseconds (the interpreter's
switch interval), so a 30 MB body or a slow template delays other requests by milliseconds, not seconds.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import msgspec
from fastapi import Request
from pydantic import BaseModel, ValidationError

from elastic.entrypoints.openai.protocol import APIError

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

_PRECISE_ERRORS_MAX_BYTES = 1 << 20
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
# Union members add their type tags to an error's location ('str', 'list[constrained-int]', ...), between
# field names; a field name is never one of these.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|bytes|constrained-[\w-]+|[\w-]+\[.*\])$")


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:  # bounded: a burst of huge requests queues here instead of taking every core
            _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1) + 1, thread_name_prefix="offload")
        return _POOL


async def offload(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking function in the worker pool and await its result (in this task's context, so log lines
    and errors there still know the request id)."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool(), call)


def validation_error(errors: list[Any]) -> APIError:
    """Pydantic's error list -> one OpenAI-style 400 with the offending field as `param` (never a 422)."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = str((first.get("ctx") or {}).get("error", ""))
        if "surrogate" in detail or "hex escape" in detail:
            detail += " (text must be valid Unicode: a \\ud800-\\udfff escape needs its pair)"
        return APIError(400, f"malformed JSON body: {detail}".rstrip(": "))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    fields = [p for p in loc if not _TYPE_TAG.match(p)]
    param = ".".join(fields) or None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return APIError(400, message, param=fields[0] if fields else None)


def _parse(model: type[M], body: bytes) -> M:
    """msgspec decodes (5x faster than pydantic's own JSON parser on a 30 MB prompt, and the parse holds the
    GIL), pydantic validates the objects; a body msgspec refuses gets pydantic's more precise error (which
    field holds the NaN) when it is small enough to parse twice."""
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        if len(body) > _PRECISE_ERRORS_MAX_BYTES:
            raise APIError(400, f"malformed JSON body: {e}") from None
        try:
            return model.model_validate_json(body)
        except ValidationError as ve:
            raise validation_error(ve.errors(include_url=False, include_input=False)) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False, include_input=False)) from None


async def parse_body(raw: Request, model: type[M]) -> M:
    """The request body as `model`, parsed and validated in the worker pool. The body size is capped by
    BodySizeLimitMiddleware while it is read."""
    body = await raw.body()
    return await offload(_parse, model, body)


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with every $ref replaced by its definition (the request models are not
    recursive), so it can sit anywhere in an OpenAPI document."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `requestBody` for a route that parses its body itself (so /openapi.json still documents it)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(model)}}}}
