"""Front-end side of a request before it reaches an engine: tokenize, apply defaults, validate, fan out n."""
from __future__ import annotations

import time
from typing import Any, Union

import msgspec

from elastic.config import ModelConfig
from elastic.frontend.chat_template import ChatTemplateRenderer
from elastic.frontend.text_encoder import TextEncoder
from elastic.protocol.to_engine import EngineCoreRequest
from elastic.sampling_params import SamplingParams
from elastic.tokenizer import generation_defaults

# A prompt is text, token ids, or {"prompt": str} / {"prompt_token_ids": [...]} (vLLM's forms).
PromptType = Union[str, list[int], dict[str, Any]]
_MIN_RENDER_CHARS = 1 << 20  # what a chat template may produce at least, whatever the context length


class InputProcessor:
    def __init__(self, tokenizer: Any, model_config: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.model_config = model_config
        defaults = generation_defaults(model_config.model)
        arch_eos = model_config.arch.eos_token_ids
        self.eos_token_id: int | None = (tokenizer.eos_token_id if tokenizer is not None
                                         else (arch_eos[0] if arch_eos else None))
        self.extra_eos_ids: list[int] = [t for t in defaults.pop("eos_token_ids", []) if t != self.eos_token_id]
        self.sampling_defaults: dict[str, Any] = defaults
        self.text_encoder = TextEncoder(tokenizer, model_config.max_model_len) if tokenizer is not None else None
        self.chat_renderer = None if tokenizer is None else ChatTemplateRenderer(
            _chat_template(tokenizer), dict(getattr(tokenizer, "special_tokens_map", {})),
            max(_MIN_RENDER_CHARS, self.text_encoder.max_chars if self.text_encoder else 0))

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.sampling_defaults)

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass token ids, or don't set skip_tokenizer_init")
            assert self.text_encoder is not None
            return prompt, self.text_encoder.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize(prompt["prompt"])
            raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def check_length(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """The server's rule: prompt plus max_tokens must fit in max_model_len."""
        max_len = self.model_config.max_model_len
        if params.max_tokens is None:  # generate up to max_model_len: the prompt must leave room for one token
            if num_prompt_tokens >= max_len:
                raise ValueError(f"This model's maximum context length is {max_len} tokens. However, the prompt "
                                 f"has {num_prompt_tokens} tokens, leaving no room for a completion.")
            return
        if num_prompt_tokens + params.max_tokens > max_len:
            raise ValueError(f"This model's maximum context length is {max_len} tokens. However, you requested "
                             f"{num_prompt_tokens + params.max_tokens} tokens ({num_prompt_tokens} in the "
                             f"prompt, {params.max_tokens} for the completion). Reduce the prompt or max_tokens.")

    def make_requests(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams) -> list[EngineCoreRequest]:
        """One engine request per sample; ids are request_id itself for n == 1, else 'request_id/i'."""
        if not params.ignore_eos and self.extra_eos_ids:
            params = msgspec.structs.replace(
                params, stop_token_ids=sorted(set(params.stop_token_ids or []) | set(self.extra_eos_ids)))
        now = time.time()
        children = [params] if params.n == 1 else [params.child(i) for i in range(params.n)]
        return [EngineCoreRequest(request_id if params.n == 1 else f"{request_id}/{i}", prompt_token_ids, p,
                                  eos_token_id=self.eos_token_id, arrival_time=now)
                for i, p in enumerate(children)]


def _chat_template(tokenizer: Any) -> str | None:
    """The tokenizer's default chat template (None without one)."""
    try:
        return tokenizer.get_chat_template()
    except (ValueError, AttributeError, TypeError):
        template = getattr(tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None
