"""Front end -> engine core messages."""
from __future__ import annotations

import msgspec

from elastic.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """One sequence to generate (n > 1 is fanned out into n of these by the front end)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = 0.0


class AbortRequests(msgspec.Struct, array_like=True, tag=True):
    request_ids: list[str]
