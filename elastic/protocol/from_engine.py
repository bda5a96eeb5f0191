"""Engine core -> front end messages.

Two channels: the handshake (HELLO, READY or a start-up failure; dict-encoded) and the output queue
(per-engine batches, array-encoded tagged union).
"""
from __future__ import annotations

from typing import Any, Union

import msgspec

from elastic.protocol.fault import RankFault
from elastic.protocol.scaling import MembershipUpdate, MigratedRequest, ScaleCommitted, ScalePrepared


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprobs at one generated position: entry 0 is the sampled token, then the top-n by rank."""

    token_ids: list[int]
    logprobs: list[float]
    sampled_rank: int  # 1-based rank of the sampled token in its distribution


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """New tokens of one request since the last step; `finish_reason` set on the last one."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | None = None  # the stop token id that ended it, if any
    num_cached_tokens: int = 0
    error: str | None = None  # with finish_reason "error": why this request (alone) failed, in words

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EplbStats(msgspec.Struct, array_like=True):
    """Expert load balancing on one engine (the same on every rank of an EP group)."""

    rebalances: int = 0  # completed
    skipped: int = 0  # started but not worth it (predicted gain below eplb_min_gain)
    balancedness: float | None = None  # mean/max tokens per rank over the window, after the last rebalance
    balancedness_before: float | None = None  # the same window under the placement it replaced
    slots_moved: int = 0  # cumulative
    bytes_moved: int = 0  # cumulative, received by this rank
    last_rebalance_s: float = 0.0
    last_stall_s: float = 0.0  # longest pause between two steps during the last rebalance
    longest_stall_s: float = 0.0


class SchedulerStats(msgspec.Struct, array_like=True):
    """Load of one engine, for metrics and (with data parallelism) routing."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    num_preemptions: int  # cumulative
    eplb: EplbStats | None = None  # with --enable-eplb
    steps_by_kind: dict[str, int] | None = None  # forwards run, by how: decode_graph, mixed_graph, eager (cumulative)


# ---- output queue ---------------------------------------------------------------------------------------
class RejectedRequest(msgspec.Struct, array_like=True):
    """A request the engine refused (it validates again; the front end should have caught it)."""

    request_id: str
    error: str


class UtilityResult(msgspec.Struct, array_like=True, omit_defaults=True):
    call_id: int
    result: Any = None
    error: str | None = None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    """Everything one engine has to say after a step (or an idle tick): one message per step."""

    engine_index: int
    timestamp: float  # engine's time.time() when the batch was sent
    outputs: list[EngineCoreOutput] = []
    scheduler_stats: SchedulerStats | None = None
    # request id -> seconds it waited in the engine before its first step (engine clock only: no skew)
    queue_times: dict[str, float] | None = None
    rejected: list[RejectedRequest] | None = None
    utility_results: list[UtilityResult] | None = None
    # Requests a leaving engine handed back (elastic scale-down): the front end re-submits them elsewhere.
    migrated: list[MigratedRequest] | None = None


class EngineDead(msgspec.Struct, array_like=True, tag=True):
    """Last words of an engine whose busy loop crashed; the process exits right after. Also relayed by the
    launcher of several API servers (`relayed`, `error` then says how the process ended) to each of them."""

    engine_index: int
    error: str
    relayed: bool = False


# MembershipUpdate: relayed by the launcher of several API servers when the engine set changes.
EngineCoreOutputMessage = Union[EngineCoreOutputs, EngineDead, MembershipUpdate]


# ---- handshake ------------------------------------------------------------------------------------------
class EngineHello(msgspec.Struct, tag=True):
    engine_index: int
    pid: int
    local: bool = True  # same host as the front end (ipc is possible)
    headless: bool = False  # started without an API server of its own


class EngineReady(msgspec.Struct, tag=True):
    """Sent on the handshake and, as the registration, on the input queue of every front end."""

    engine_index: int
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    pid: int | None = None
    # Device memory left once the KV cache is allocated (CUDA; None on CPU), and the expert slots per layer
    # its storage holds: what a scale-down that gives this rank more slots needs (elastic_ep/capacity.py).
    free_memory_bytes: int | None = None
    expert_slot_capacity: int | None = None


class EngineStartupFailed(msgspec.Struct, tag=True):
    engine_index: int
    error: str


# After READY the handshake socket is the launcher's control channel (elastic scaling).
EngineHandshakeMessage = Union[EngineHello, EngineReady, EngineStartupFailed, ScalePrepared, ScaleCommitted,
                               RankFault]
