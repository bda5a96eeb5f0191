"""Front end -> engine core messages.

Two channels: the handshake (rare, dict-encoded so it can grow fields freely) and the input queue (hot,
array-encoded, one tagged union so one decoder reads every message).
"""
from __future__ import annotations

from typing import Any, Union

import msgspec

from elastic.config.engine import ParallelConfig
from elastic.protocol.scaling import JoinInfo
from elastic.sampling_params import SamplingParams


# ---- input queue ---------------------------------------------------------------------------------------
class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    """One sequence to generate (n > 1 is fanned out into n of these by the front end)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = 0.0
    # A request moved off a leaving engine (elastic scale-down): the tokens it already generated (prefilled
    # again after the prompt) and its seeded generator's state, so it continues where it stopped.
    resumed_token_ids: list[int] = []
    generator_state: bytes | None = None


class AbortRequests(msgspec.Struct, array_like=True, tag=True):
    request_ids: list[str]


class UtilityCall(msgspec.Struct, array_like=True, tag=True):
    """Call an allow-listed engine method; the result comes back in an output batch under `call_id`."""

    call_id: int
    method: str
    args: list[Any] = []


class ShutdownEngine(msgspec.Struct, array_like=True, tag=True):
    """Finish the current step, close the sockets and exit 0 (works for remote engines too)."""


EngineCoreInput = Union[EngineCoreRequest, AbortRequests, UtilityCall, ShutdownEngine]


# ---- handshake ------------------------------------------------------------------------------------------
class HandshakeAddresses(msgspec.Struct, tag=True):
    """Front end's answer to HELLO: where to connect, and the parallel layout to join (the same
    ParallelConfig the engine's config carries; with data_parallel_size > 1 its store host/port are the
    TCPStore rendezvous of the stateless DP/EP groups, hosted by the launcher)."""

    input_address: str  # engine connects a DEALER (identity = its index) to the front end's ROUTER
    output_address: str  # engine connects a PUSH to the front end's PULL
    parallel: ParallelConfig
    coordinator_address: str | None = None  # DP coordinator's input (engine connects a PUSH); None with DP=1
    stats_interval_s: float = 5.0  # how often an idle engine re-sends its stats (also a liveness signal)
    coordinator_pub_address: str | None = None  # DP coordinator's engine PUB (START_DP_WAVE); engine SUBs
    # Several API servers (--api-server-count): one input and one output queue per front end, in front-end
    # order; when set they replace input_address / output_address (which stay those of front end 0).
    frontend_input_addresses: list[str] = []
    frontend_output_addresses: list[str] = []
    # An engine started by a scale-up: where its weights come from and the KV size it adopts.
    join: JoinInfo | None = None
    epoch: int = 0  # of the layout in `parallel` (elastic scaling: group names are dp/<epoch>, ep/<epoch>)


def engine_identity(engine_id: int) -> bytes:
    """The ZMQ identity an engine uses on every socket to the front ends: its engine id (stable for the
    process's life, unlike its DP rank), 4 bytes."""
    return engine_id.to_bytes(4, "little")
