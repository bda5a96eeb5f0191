"""OpenAI-compatible request models (pydantic) and the OpenAI error body.

Field names follow OpenAI, plus vLLM's extras in the body (top_k, min_p, repetition_penalty, ignore_eos,
min_tokens, stop_token_ids, ...). Unknown fields are accepted and ignored, as other OpenAI-compatible
servers do, so clients that send newer fields keep working.

Every field is bounded here, with the limits SamplingParams enforces (elastic/sampling_params.py: one
definition): integers fit in 64 bits, floats are finite, types are strict (`"stream": "yes"` is not a
boolean), and lists and maps have caps. SamplingParams re-checks the values it receives (the engine core
does again on decode); model-dependent checks (token ids < vocab, context length) live in
elastic/validation.py. Responses are plain dicts built by the handlers.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from elastic.sampling_params import (INT64_MAX, INT64_MIN, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, MAX_PROMPTS,
                                     MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, MAX_TEMPERATURE)

MAX_TOKEN_IDS = 1 << 20  # in one token-id list (a prompt, /detokenize); no context is longer
MAX_CHAT_TEMPLATE_CHARS = 256 * 1024  # a request's own chat template (model templates are ~1-20 KiB)

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_TOKEN_IDS)]
StopString = Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)]
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]

# ---- errors -------------------------------------------------------------------------------------------------
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 413: "RequestTooLargeError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}


class APIError(Exception):
    """Raised by handlers; rendered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status_code: int, message: str, param: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.type = type or _ERROR_TYPES.get(status_code, "APIError")

    def body(self) -> dict[str, Any]:
        return error_body(self.status_code, self.message, self.param, self.type)


def error_body(status_code: int, message: str, param: str | None = None, type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _ERROR_TYPES.get(status_code, "APIError"),
                      "param": param, "code": status_code}}


# ---- requests -----------------------------------------------------------------------------------------------
class OpenAIModel(BaseModel):
    # unknown fields: accepted, ignored; NaN / Infinity / 1e999 are not numbers a client can mean
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingFields(OpenAIModel):
    """Fields shared by completions and chat completions (None: the model's or SamplingParams' default)."""

    model: str | None = None
    n: int | None = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)  # token id (a string) -> bias
    stop: Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)], None] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(0, ge=0, le=INT64_MAX)
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    prompt_logprobs: Logprobs | None = None
    return_tokens_as_token_ids: bool | None = False
    return_token_ids: bool | None = False  # add token_ids (and prompt_token_ids) to each choice
    truncate_prompt_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)


class CompletionRequest(SamplingFields):
    prompt: Union[TokenIds, Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)], str,
                  Annotated[list[str], Field(max_length=MAX_PROMPTS)]]
    # max_tokens' lower bound is SamplingParams' (so chat's max_completion_tokens reports as max_tokens too)
    max_tokens: Int64 | None = 16
    echo: bool | None = False
    logprobs: Logprobs | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None
    add_special_tokens: bool | None = True


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextContentPart], None] = None
    name: str | None = None

    def text(self) -> str:
        """Text parts are joined with newlines (what templates expecting a string content need)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int64 | None = None  # deprecated by OpenAI, still what most clients send
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = False
    top_logprobs: Logprobs | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    # A request's own template runs only with --trust-request-chat-template (here or in chat_template_kwargs).
    chat_template: str | None = Field(None, max_length=MAX_CHAT_TEMPLATE_CHARS)
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool | None = False  # the chat template already places special tokens
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template: str | None = Field(None, max_length=MAX_CHAT_TEMPLATE_CHARS)
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: TokenIds
