"""POST /v1/completions: text or token-id prompts (one or many), n samples each, streamed or not."""
from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from elastic.entrypoints.openai.offload import offload
from elastic.entrypoints.openai.protocol import APIError, CompletionRequest
from elastic.entrypoints.openai.serving import (SSE_DONE, ChoiceCursor, ServingContext, build_sampling_params,
                                                completion_logprobs, engine_error, final_outputs, merge_generators,
                                                now, random_id, run_with_disconnect, sse, stream_error, truncate,
                                                usage, validate_prompt)
from elastic.outputs import RequestOutput
from elastic.sampling_params import MAX_SEQUENCES, SamplingParams


def _prompts(ctx: ServingContext, req: CompletionRequest, params: SamplingParams) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) per prompt, validated; a list of ints is one token-id prompt, not many.
    Blocking (tokenization): runs in the worker pool."""
    prompt = req.prompt
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if len(items) * params.n > MAX_SEQUENCES:
        raise APIError(400, f"{len(items)} prompts x n={params.n} is more than {MAX_SEQUENCES} sequences in one "
                            "request", param="n")
    out = []
    for item in items:
        if isinstance(item, str):
            ctx.require_tokenizer("prompt")
            try:
                ids = ctx.engine.input_processor.text_encoder.encode(
                    item, bool(req.add_special_tokens), keep_last=req.truncate_prompt_tokens)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
            out.append((item, ids))
        else:
            out.append((None, truncate(list(item), req.truncate_prompt_tokens)))
        validate_prompt(ctx, out[-1][1], params, "prompt")
    return out


def _prompt_logprobs_field(ctx: ServingContext, out: RequestOutput) -> list[Any] | None:
    """vLLM's `prompt_logprobs` extra: per prompt position {token id: {logprob, decoded_token}} (None first)."""
    if out.prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(t): {"logprob": lp, "decoded_token": ctx.decode([t])} for t, lp in entry.items()}
            for entry in out.prompt_logprobs]


class CompletionHandler:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def __call__(self, req: CompletionRequest, raw: Request) -> Response:
        ctx = self.ctx
        ctx.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        echo_logprobs = bool(req.echo) and req.logprobs is not None
        params = build_sampling_params(ctx, req, max_tokens=req.max_tokens, logprobs=req.logprobs,
                                       prompt_logprobs=req.logprobs if echo_logprobs else req.prompt_logprobs)
        prompts = await offload(_prompts, ctx, req, params)
        ctx.check_ready()
        request_id = random_id("cmpl")
        generators = [ctx.engine.generate(f"{request_id}-{i}", text, ids, params)
                      for i, (text, ids) in enumerate(prompts)]
        if req.stream:
            return StreamingResponse(self._stream(req, params, request_id, generators),
                                     media_type="text/event-stream")
        finals = await run_with_disconnect(raw, self._collect(generators))
        if finals is None:
            return Response(status_code=499)  # nobody is listening
        # Decoding echoed prompts and logprobs grows with the output: built in the worker pool.
        return JSONResponse(await offload(self._response, req, request_id, final_outputs(finals)))

    @staticmethod
    async def _collect(generators: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput | None]:
        finals: list[RequestOutput | None] = [None] * len(generators)
        try:
            async with aclosing(merge_generators(generators)) as stream:
                async for index, output in stream:
                    finals[index] = output
        except Exception as e:
            raise engine_error(e) from e
        return finals

    def _prompt_text(self, out: RequestOutput) -> str:
        return out.prompt if out.prompt is not None else self.ctx.decode(out.prompt_token_ids)

    def _response(self, req: CompletionRequest, request_id: str, finals: list[RequestOutput]) -> dict[str, Any]:
        ctx, as_ids, n = self.ctx, bool(req.return_tokens_as_token_ids), req.n or 1
        choices = []
        for i, out in enumerate(finals):
            prompt_text = self._prompt_text(out) if req.echo else ""
            for o in out.outputs:
                logprobs = None
                if req.logprobs is not None:
                    token_ids, entries = o.token_ids, list(o.logprobs or [])
                    if req.echo:
                        prompt_entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                        token_ids, entries = out.prompt_token_ids + token_ids, list(prompt_entries) + entries
                    logprobs = completion_logprobs(ctx, token_ids, entries, 0, as_ids)
                choice: dict[str, Any] = {"index": i * n + o.index, "text": prompt_text + o.text,
                                          "logprobs": logprobs, "finish_reason": o.finish_reason,
                                          "stop_reason": o.stop_reason}
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = _prompt_logprobs_field(ctx, out)
                if req.return_token_ids or ctx.tokenizer is None:
                    choice.update(prompt_token_ids=out.prompt_token_ids, token_ids=o.token_ids)
                choices.append(choice)
        num_prompt = sum(len(out.prompt_token_ids) for out in finals)
        num_completion = sum(len(o.token_ids) for out in finals for o in out.outputs)
        return {"id": request_id, "object": "text_completion", "created": now(), "model": ctx.served_model_name,
                "choices": choices, "system_fingerprint": None,
                "usage": usage(num_prompt, num_completion, sum(out.num_cached_tokens for out in finals))}

    async def _stream(self, req: CompletionRequest, params: SamplingParams, request_id: str,
                      generators: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        ctx, as_ids = self.ctx, bool(req.return_tokens_as_token_ids)
        created, model = now(), ctx.served_model_name
        options = req.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and bool(options and options.continuous_usage_stats)
        with_ids = bool(req.return_token_ids) or ctx.tokenizer is None  # without text, ids are the progress
        cursors: dict[int, ChoiceCursor] = {}
        prompt_tokens: dict[int, int] = {}
        completion_tokens: dict[int, int] = {}
        try:
            async with aclosing(merge_generators(generators)) as stream:
                async for i, out in stream:
                    prompt_tokens[i] = len(out.prompt_token_ids)
                    for o in out.outputs:
                        index = i * params.n + o.index
                        completion_tokens[index] = len(o.token_ids)
                        cursor = cursors.get(index)
                        first = cursor is None
                        if cursor is None:
                            cursor = cursors[index] = ChoiceCursor()
                        if cursor.finished:
                            continue
                        text, new_ids, entries = cursor.delta(o)
                        if not (text or o.finish_reason or (first and req.echo) or (with_ids and new_ids)):
                            continue  # e.g. half a UTF-8 character, or text held back for a stop string
                        offset, token_ids = cursor.text_len + cursor.echo_len, new_ids
                        if first and req.echo:
                            prompt_text = self._prompt_text(out)
                            cursor.echo_len = len(prompt_text)
                            text = prompt_text + text
                            prompt_entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                            token_ids, entries = out.prompt_token_ids + new_ids, list(prompt_entries) + entries
                        cursor.commit(o)
                        logprobs = (completion_logprobs(ctx, token_ids, entries, offset, as_ids)
                                    if req.logprobs is not None else None)
                        choice: dict[str, Any] = {"index": index, "text": text, "logprobs": logprobs,
                                                  "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                        if with_ids:
                            choice["token_ids"] = new_ids
                            if first:
                                choice["prompt_token_ids"] = out.prompt_token_ids
                        chunk: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created,
                                                 "model": model, "choices": [choice]}
                        if continuous:
                            chunk["usage"] = usage(prompt_tokens[i], completion_tokens[index])
                        yield sse(chunk)
            if include_usage:
                yield sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": usage(sum(prompt_tokens.values()),
                                                         sum(completion_tokens.values()))})
        except Exception as e:
            yield stream_error(e)
        yield SSE_DONE
