"""Per-request sampling parameters (vLLM names), also the wire format to the engine core.

The request limits below are defined once, here (the lowest layer every process shares): the HTTP schema
(entrypoints/openai/protocol.py) declares them as field bounds, SamplingParams checks them on construction
and on every decode in the engine core, and elastic/validation.py adds the model-dependent checks.
"""
from __future__ import annotations

import math
from typing import Any

import msgspec

# ---- request limits ---------------------------------------------------------------------------------------
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1  # every integer a client sends must fit a torch int64
MAX_N = 128  # samples per prompt (OpenAI's cap)
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MAX_SEQUENCES = 1024  # prompts x n: engine requests one HTTP request may start
MAX_TEMPERATURE = 100.0  # far past uniform sampling; the cap only keeps the arithmetic finite
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries
MAX_LOGIT_BIAS_VALUE = 100.0  # OpenAI's range; the HTTP layer clamps finite values into it, as vLLM does
_INT_FIELDS = ("n", "top_k", "min_tokens")
_OPTIONAL_INT_FIELDS = ("max_tokens", "seed", "logprobs", "prompt_logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_valid_text(text: Any) -> bool:
    """A str that UTF-8 can encode (no lone surrogates: tokenizers and JSON encoders reject those)."""
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class SamplingParams(msgspec.Struct, omit_defaults=True):
    """How to sample one request. Validated on construction; `ValueError` names the bad field."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # top-n logprobs per generated token (the sampled token is always included)
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, field: str, msg: str) -> None:
            if not ok:
                value = repr(getattr(self, field))
                raise ValueError(f"{field} {msg}, got {value if len(value) <= 80 else value[:77] + '...'}")

        # Types first: a float top_k or an inf temperature must fail here, not inside the sampler.
        for name in _INT_FIELDS + _OPTIONAL_INT_FIELDS:
            value = getattr(self, name)
            check(value is None and name in _OPTIONAL_INT_FIELDS or is_int(value) and INT64_MIN <= value <= INT64_MAX,
                  name, "must be an integer that fits in 64 bits")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), name,
                  "must be a finite number")
        check(1 <= self.n <= MAX_N, "n", f"must be in [1, {MAX_N}]")
        check(0.0 <= self.temperature <= MAX_TEMPERATURE, "temperature", f"must be in [0, {MAX_TEMPERATURE:g}]")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(self.top_k >= 0, "top_k", "must be -1 (disabled) or positive")
        check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "must be in (0, 2]")
        check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1")
        check(self.min_tokens >= 0, "min_tokens", "must be non-negative")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
              f"must not exceed max_tokens={self.max_tokens}")
        check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
              f"must be in [0, {MAX_LOGPROBS}]")
        check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
              "prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        self._validate_lists(check)
        check(self.seed is None or 0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")

    def _validate_lists(self, check: Any) -> None:
        stop = self.stop
        check(stop is None or isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS, "stop",
              f"must be at most {MAX_STOP_STRINGS} strings")
        check(stop is None or all(is_valid_text(s) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in stop), "stop",
              f"must be non-empty strings of valid Unicode, at most {MAX_STOP_STRING_CHARS} characters each")
        ids = self.stop_token_ids
        check(ids is None or isinstance(ids, list) and len(ids) <= MAX_STOP_TOKEN_IDS
              and all(is_int(t) and 0 <= t <= INT64_MAX for t in ids), "stop_token_ids",
              f"must be at most {MAX_STOP_TOKEN_IDS} non-negative token ids")
        bias = self.logit_bias
        check(bias is None or isinstance(bias, dict) and len(bias) <= MAX_LOGIT_BIAS, "logit_bias",
              f"must have at most {MAX_LOGIT_BIAS} entries")
        check(bias is None or all(is_int(t) and 0 <= t <= INT64_MAX for t in bias), "logit_bias",
              "keys must be non-negative token ids")
        check(bias is None or all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                                  and abs(b) <= MAX_LOGIT_BIAS_VALUE for b in bias.values()), "logit_bias",
              f"values must be finite numbers in [-{MAX_LOGIT_BIAS_VALUE:g}, {MAX_LOGIT_BIAS_VALUE:g}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0) if self.stop else 0

    def child(self, index: int) -> SamplingParams:
        """Parameters of the index-th of n samples: one sequence each, distinct seeds."""
        seed = None if self.seed is None else (self.seed + index) % 2**63
        return msgspec.structs.replace(self, n=1, seed=seed)
