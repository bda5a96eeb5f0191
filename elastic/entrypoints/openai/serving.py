"""What completions and chat completions share: request -> SamplingParams, running one request per prompt,
client-disconnect handling, logprob formatting and server-sent events."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, TypeVar

import msgspec
from fastapi import Request

from elastic.entrypoints.middleware import current_request_id
from elastic.entrypoints.openai.protocol import APIError, SamplingFields, error_body
from elastic.frontend.async_llm import (AsyncLLM, EngineDeadError, EngineNotReadyError, RequestFailedError,
                                        RequestRejectedError)
from elastic.outputs import RequestOutput
from elastic.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
SSE_DONE = "data: [DONE]\n\n"
_NEG_INF_LOGPROB = -9999.0  # JSON has no -inf; what vLLM sends for impossible tokens
_PARAM_IN_MESSAGE = re.compile(r"^(\w+) ")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(data: dict[str, Any]) -> str:
    return f"data: {msgspec.json.encode(data).decode()}\n\n"


def clean_logprob(value: float) -> float:
    return value if value > _NEG_INF_LOGPROB else _NEG_INF_LOGPROB


@dataclass
class ServingContext:
    """What the handlers need from the server: the engine, the model's public name, the server's policy."""

    engine: AsyncLLM
    served_model_name: str
    trust_request_chat_template: bool = False
    _token_strs: dict[int, str] = field(default_factory=dict)  # logprob formatting decodes the same ids a lot

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model")

    def check_ready(self) -> None:
        try:
            self.engine.check_ready()
        except (EngineNotReadyError, EngineDeadError) as e:
            raise APIError(503, str(e)) from None

    def require_tokenizer(self, param: str) -> Any:
        if self.tokenizer is None:
            raise APIError(400, "this server runs without a tokenizer (--skip-tokenizer-init): send token ids",
                           param=param)
        return self.tokenizer

    def token_str(self, token_id: int, as_ids: bool) -> str:
        if as_ids or self.tokenizer is None:
            return f"token_id:{token_id}"
        text = self._token_strs.get(token_id)
        if text is None:
            text = self._token_strs[token_id] = self.tokenizer.decode([token_id])
        return text

    def decode(self, token_ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(token_ids)


def param_error(e: ValueError, default_param: str | None = None) -> APIError:
    """SamplingParams' messages start with the field name: report it as the OpenAI `param`."""
    m = _PARAM_IN_MESSAGE.match(str(e))
    param = m.group(1) if m and m.group(1) in SamplingParams.__struct_fields__ else default_param
    return APIError(400, str(e), param=param)


def build_sampling_params(ctx: ServingContext, req: SamplingFields, *, max_tokens: int | None,
                          logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    """Request fields over the model's generation_config defaults over SamplingParams' own defaults."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    kwargs: dict[str, Any] = dict(ctx.engine.input_processor.sampling_defaults)
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
                 "skip_special_tokens"):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    if req.stop:
        kwargs["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.logit_bias:
        try:
            kwargs["logit_bias"] = {int(t): max(-100.0, min(100.0, float(b))) for t, b in req.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
    kwargs.update(n=1 if req.n is None else req.n, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise param_error(e) from None


def validate_prompt(ctx: ServingContext, prompt_token_ids: list[int], params: SamplingParams, param: str) -> None:
    try:
        ctx.engine.validate(prompt_token_ids, params)
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None


def truncate(prompt_token_ids: list[int], keep: int | None) -> list[int]:
    return prompt_token_ids[-keep:] if keep else prompt_token_ids


async def merge_generators(generators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive; closing this closes (and so aborts) them all."""
    if len(generators) == 1:
        try:
            async for item in generators[0]:
                yield 0, item
        finally:
            await generators[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    done = object()

    async def drain(index: int, gen: AsyncIterator[T]) -> None:
        try:
            async for item in gen:
                queue.put_nowait((index, item, None))
            queue.put_nowait((index, done, None))
        except Exception as e:
            queue.put_nowait((index, done, e))

    tasks = [asyncio.create_task(drain(i, g)) for i, g in enumerate(generators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_with_disconnect(raw: Request, work: Awaitable[T]) -> T | None:
    """Await `work` unless the client disconnects first; then cancel it (aborting its requests) -> None."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    logger.info("client disconnected; its request was aborted")
    return None


def engine_error(e: BaseException) -> APIError:
    """Map what generation can raise once a request was accepted to an HTTP error."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestRejectedError):
        return APIError(400, str(e))
    if isinstance(e, (EngineDeadError, EngineNotReadyError)):
        return APIError(503, with_request_id(str(e)))
    if isinstance(e, RequestFailedError):
        return APIError(500, with_request_id(f"the engine failed this request: {e}"))
    logger.error("request %s failed", current_request_id(), exc_info=e)  # the traceback stays in the log
    return APIError(500, with_request_id("internal error while serving this request; the server log has the details"))


def with_request_id(message: str) -> str:
    """Server-side errors name the request, so a report can be matched to the server log."""
    rid = current_request_id()
    return f"{message} (request id {rid})" if rid else message


def stream_error(e: BaseException) -> str:
    err = engine_error(e)
    return sse(error_body(err.status_code, err.message, err.param, err.type))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def now() -> int:
    return int(time.time())


# ---- logprobs -----------------------------------------------------------------------------------------------
def completion_logprobs(ctx: ServingContext, token_ids: list[int], logprobs: list[dict[int, float] | None],
                        text_offset: int, as_ids: bool) -> dict[str, Any]:
    """Legacy completions format: parallel lists; `top_logprobs` holds the sampled token plus the top-n."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(token_ids, logprobs):
        token = ctx.token_str(token_id, as_ids)
        out["tokens"].append(token)
        out["text_offset"].append(text_offset)
        text_offset += len(token)
        if entry is None:  # the first prompt token has nothing to be conditioned on
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(clean_logprob(entry.get(token_id, float("-inf"))))
        out["top_logprobs"].append({ctx.token_str(t, as_ids): clean_logprob(lp) for t, lp in entry.items()})
    return out


def chat_logprobs(ctx: ServingContext, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int,
                  as_ids: bool) -> list[dict[str, Any]]:
    """Chat format: one entry per token with exactly `top_n` alternatives, best first."""
    def entry(token_id: int, lp: float) -> dict[str, Any]:
        token = ctx.token_str(token_id, as_ids)
        return {"token": token, "logprob": clean_logprob(lp), "bytes": list(token.encode("utf-8"))}

    content = []
    for token_id, alternatives in zip(token_ids, logprobs):
        item = entry(token_id, alternatives.get(token_id, float("-inf")))
        best = sorted(alternatives.items(), key=lambda kv: kv[1], reverse=True)[:top_n]
        item["top_logprobs"] = [entry(t, lp) for t, lp in best]
        content.append(item)
    return content


@dataclass
class ChoiceCursor:
    """How much of one choice a stream has sent (snapshots are cumulative)."""

    text_len: int = 0
    num_tokens: int = 0
    finished: bool = False
    echo_len: int = 0  # characters of echoed prompt sent before the completion (completions' echo)

    def delta(self, output: Any) -> tuple[str, list[int], list[Any]]:
        """Text, token ids and logprobs not sent yet (nothing is marked sent until `commit`)."""
        logprobs = output.logprobs[self.num_tokens:] if output.logprobs is not None else []
        return output.text[self.text_len:], output.token_ids[self.num_tokens:], logprobs

    def commit(self, output: Any) -> None:
        self.text_len, self.num_tokens = len(output.text), len(output.token_ids)
        self.finished = output.finish_reason is not None


def final_outputs(outputs: list[RequestOutput | None]) -> list[RequestOutput]:
    missing = [i for i, o in enumerate(outputs) if o is None]
    if missing:
        raise APIError(500, f"no output for prompt(s) {missing}")
    return outputs  # type: ignore[return-value]
