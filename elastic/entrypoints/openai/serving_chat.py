"""POST /v1/chat/completions: the tokenizer's chat template renders the messages; replies stream as deltas."""
from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from elastic.entrypoints.openai.offload import offload
from elastic.entrypoints.openai.protocol import APIError, ChatCompletionRequest, ChatMessage
from elastic.entrypoints.openai.serving import (SSE_DONE, ChoiceCursor, ServingContext, build_sampling_params,
                                                chat_logprobs, engine_error, merge_generators, now, random_id,
                                                run_with_disconnect, sse, stream_error, usage, validate_prompt)
from elastic.frontend.chat_template import ChatTemplateError
from elastic.outputs import RequestOutput
from elastic.sampling_params import SamplingParams


def render_chat(ctx: ServingContext, messages: list[ChatMessage], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template: str | None = None,
                chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """The prompt text for a conversation, rendered in the sandbox with its time and size limits (blocking:
    runs in the worker pool). Content is flattened to a string, which every template accepts. A template
    sent with the request runs only with --trust-request-chat-template."""
    ctx.require_tokenizer("messages")
    if add_generation_prompt and continue_final_message:
        raise APIError(400, "continue_final_message needs add_generation_prompt=false",
                       param="continue_final_message")
    kwargs = dict(chat_template_kwargs or {})
    template = chat_template if chat_template is not None else kwargs.pop("chat_template", None)
    kwargs.pop("chat_template", None)
    if template is not None:
        if not ctx.trust_request_chat_template:
            raise APIError(400, "this server does not run chat templates sent with a request; its operator can "
                                "allow them with --trust-request-chat-template", param="chat_template")
        if not isinstance(template, str):
            raise APIError(400, "chat_template must be a string", param="chat_template")
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in messages]
    renderer = ctx.engine.input_processor.chat_renderer
    if template is None and not renderer.template:
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    try:
        return renderer.render(conversation, add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message, template=template, kwargs=kwargs)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages" if template is None else "chat_template") from None


def _chat_prompt(ctx: ServingContext, req: ChatCompletionRequest, params: SamplingParams) -> tuple[str, list[int]]:
    """Render, tokenize and validate (blocking: runs in the worker pool)."""
    prompt = render_chat(ctx, req.messages, add_generation_prompt=bool(req.add_generation_prompt),
                         continue_final_message=bool(req.continue_final_message), chat_template=req.chat_template,
                         chat_template_kwargs=req.chat_template_kwargs)
    try:
        ids = ctx.engine.input_processor.text_encoder.encode(prompt, bool(req.add_special_tokens),
                                                             keep_last=req.truncate_prompt_tokens)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    validate_prompt(ctx, ids, params, "messages")
    return prompt, ids


class ChatHandler:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def __call__(self, req: ChatCompletionRequest, raw: Request) -> Response:
        ctx = self.ctx
        ctx.check_model(req.model)
        if req.tools and req.tool_choice != "none":
            raise APIError(400, "tool calling is not supported", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = build_sampling_params(ctx, req, max_tokens=max_tokens,
                                       logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                       prompt_logprobs=req.prompt_logprobs)
        prompt, ids = await offload(_chat_prompt, ctx, req, params)
        ctx.check_ready()
        request_id = random_id("chatcmpl")
        generator = ctx.engine.generate(request_id, prompt, ids, params)
        if req.stream:
            return StreamingResponse(self._stream(req, params, request_id, generator, len(ids)),
                                     media_type="text/event-stream")
        final = await run_with_disconnect(raw, self._collect(generator))
        if final is None:
            return Response(status_code=499)  # nobody is listening
        return JSONResponse(await offload(self._response, req, request_id, final))  # logprobs decode: off the loop

    @staticmethod
    async def _collect(generator: AsyncIterator[RequestOutput]) -> RequestOutput:
        final = None
        try:
            async with aclosing(merge_generators([generator])) as stream:
                async for _, output in stream:
                    final = output
        except Exception as e:
            raise engine_error(e) from e
        if final is None:
            raise APIError(500, "the request produced no output")
        return final

    def _logprobs(self, req: ChatCompletionRequest, token_ids: list[int], entries: list[Any]) -> Any:
        if not req.logprobs:
            return None
        return {"content": chat_logprobs(self.ctx, token_ids, entries, req.top_logprobs or 0,
                                         bool(req.return_tokens_as_token_ids))}

    def _response(self, req: ChatCompletionRequest, request_id: str, out: RequestOutput) -> dict[str, Any]:
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "logprobs": self._logprobs(req, o.token_ids, list(o.logprobs or [])),
                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason} for o in out.outputs]
        if req.return_token_ids:
            for choice, o in zip(choices, out.outputs):
                choice.update(prompt_token_ids=out.prompt_token_ids, token_ids=o.token_ids)
        return {"id": request_id, "object": "chat.completion", "created": now(), "model": self.ctx.served_model_name,
                "choices": choices, "system_fingerprint": None,
                "usage": usage(len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs),
                               out.num_cached_tokens)}

    async def _stream(self, req: ChatCompletionRequest, params: SamplingParams, request_id: str,
                      generator: AsyncIterator[RequestOutput], num_prompt: int) -> AsyncIterator[str]:
        created, model = now(), self.ctx.served_model_name
        options = req.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and bool(options and options.continuous_usage_stats)
        completion_tokens = [0] * params.n
        cursors = [ChoiceCursor() for _ in range(params.n)]

        def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None,
                  stop_reason: Any = None) -> str:
            body: dict[str, Any] = {
                "id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                             "stop_reason": stop_reason}]}
            if continuous:
                body["usage"] = usage(num_prompt, completion_tokens[index])
            return sse(body)

        try:
            # The role comes first, once per choice, before any token (clients key the message on it).
            for index in range(params.n):
                yield chunk(index, {"role": "assistant", "content": ""})
            async with aclosing(merge_generators([generator])) as stream:
                async for _, out in stream:
                    for o in out.outputs:
                        cursor = cursors[o.index]
                        completion_tokens[o.index] = len(o.token_ids)
                        if cursor.finished:
                            continue
                        text, token_ids, entries = cursor.delta(o)
                        if not text and o.finish_reason is None:
                            continue  # half a UTF-8 character, or text held back for a stop string
                        cursor.commit(o)
                        delta: dict[str, Any] = {"content": text}
                        if req.return_token_ids:
                            delta["token_ids"] = token_ids
                        yield chunk(o.index, delta, self._logprobs(req, token_ids, entries), o.finish_reason,
                                    o.stop_reason)
            if include_usage:
                yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": usage(num_prompt, sum(completion_tokens))})
        except Exception as e:
            yield stream_error(e)
        yield SSE_DONE
