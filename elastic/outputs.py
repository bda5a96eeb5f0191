"""What `LLM.generate` returns (vLLM's shapes, so callers can switch engines)."""
from __future__ import annotations

from dataclasses import dataclass, field

# One dict per position: token id -> logprob; the sampled token is always a key.
SampleLogprobs = list[dict[int, float]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finished: bool = False
    num_cached_tokens: int = 0
