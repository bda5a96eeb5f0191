"""Per-request sampling parameters (vLLM names), also the wire format to the engine core."""
from __future__ import annotations

import msgspec

_MAX_LOGPROBS = 20


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
                raise ValueError(f"{field} {msg}, got {getattr(self, field)!r}")

        check(self.n >= 1, "n", "must be at least 1")
        check(self.temperature >= 0.0, "temperature", "must be non-negative")
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
        check(self.logprobs is None or 0 <= self.logprobs <= _MAX_LOGPROBS, "logprobs",
              f"must be in [0, {_MAX_LOGPROBS}]")
        check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= _MAX_LOGPROBS,
              "prompt_logprobs", f"must be in [0, {_MAX_LOGPROBS}]")
        check(self.stop is None or all(isinstance(s, str) and s for s in self.stop), "stop",
              "must be non-empty strings")
        check(self.stop_token_ids is None or all(t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "must be non-negative token ids")
        check(self.seed is None or 0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")

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
