"""A request's state inside the engine core (tokens, progress, KV blocks, sampling state) and the batch the
scheduler hands the model runner. Plain data shared by the engine, the model runner and the sampler."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from elastic.protocol.from_engine import TokenLogprobs
from elastic.protocol.to_engine import EngineCoreRequest
from elastic.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Request:
    def __init__(self, req: EngineCoreRequest, device: torch.device) -> None:
        self.request_id = req.request_id
        self.prompt_token_ids = list(req.prompt_token_ids)
        # prompt + generated; a request moved from another engine brings what it generated there
        self.all_token_ids = list(req.prompt_token_ids) + list(req.resumed_token_ids)
        self.num_prompt_tokens = len(req.prompt_token_ids)
        self.params: SamplingParams = req.sampling_params
        self.eos_token_id = req.eos_token_id
        self.arrival_time = req.arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # of the prompt, found in the prefix cache on admission
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading full blocks already registered in the prefix cache
        self.block_hashes: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | None = None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None  # filled while the prompt is computed
        # A seeded request draws from its own generator, so its samples don't depend on the batch.
        self.generator: torch.Generator | None = None
        if self.params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.params.seed)
            if req.generator_state is not None:  # continue the sequence the other engine was drawing
                self.generator.set_state(torch.frombuffer(bytearray(req.generator_state), dtype=torch.uint8))

    def generator_state(self) -> bytes | None:
        """The seeded generator's state, for handing the request to another engine."""
        return None if self.generator is None else self.generator.get_state().numpy().tobytes()

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int, max_model_len: int) -> None:
        """Add a sampled token and decide whether the request is done."""
        self.all_token_ids.append(token_id)
        params = self.params
        n_out = self.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token_id == self.eos_token_id:
                self.finish_reason = "stop"
            elif params.stop_token_ids and token_id in params.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", token_id
        if self.finish_reason is None and self.reaches_length(0, max_model_len):
            self.finish_reason = "length"

    def reaches_length(self, more: int, max_model_len: int) -> bool:
        """Whether the request ends by length once `more` tokens beyond those it holds are appended (its
        max_tokens, or the model's context)."""
        max_tokens = self.params.max_tokens
        return (max_tokens is not None and self.num_output_tokens + more >= max_tokens) or \
            self.num_tokens + more >= max_model_len


def check_inputs(req: Request, num_new: int, vocab_size: int, max_model_len: int, block_size: int) -> None:
    """Raise ValueError if the model runner could not build this request's part of the batch. The engine
    validated the request on arrival; this catches what could still break one step for everyone (cheap: the
    new tokens only)."""
    start, end = req.num_computed_tokens, req.num_computed_tokens + num_new
    if not (0 < num_new and end <= min(req.num_tokens, max_model_len)):
        raise ValueError(f"cannot compute positions {start}..{end} of a {req.num_tokens}-token sequence")
    if len(req.block_table) * block_size < end:
        raise ValueError(f"{len(req.block_table)} KV blocks cannot hold {end} tokens")
    new = req.all_token_ids[start:end]
    if min(new) < 0 or max(new) >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size})")


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens to compute now)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)
