"""OpenAI-compatible request models (pydantic) and the OpenAI error body.

Field names follow OpenAI, plus vLLM's extras in the body (top_k, min_p, repetition_penalty, ignore_eos,
min_tokens, stop_token_ids, ...). Unknown fields are accepted and ignored, as other OpenAI-compatible
servers do, so clients that send newer fields keep working. Value checks live in SamplingParams (one source
of truth); pydantic only checks types. Responses are plain dicts built by the handlers.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

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
    model_config = ConfigDict(extra="allow")  # unknown fields: accepted, ignored


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingFields(OpenAIModel):
    """Fields shared by completions and chat completions (None: the model's or SamplingParams' default)."""

    model: str | None = None
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool | None = False
    return_token_ids: bool | None = False  # add token_ids (and prompt_token_ids) to each choice
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(SamplingFields):
    prompt: Union[list[int], list[list[int]], str, list[str]]
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
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
    max_tokens: int | None = None  # deprecated by OpenAI, still what most clients send
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
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
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]
