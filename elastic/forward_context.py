"""The one piece of global state: metadata of the batch being run, set around each forward.

Layers read it instead of taking it as arguments, so model code reads like single-sequence code. It is
per thread: elastic scaling captures the next layout's CUDA graphs in a background thread while the
engine's thread serves.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1: don't store)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B + 1] int32: request b owns query rows [q[b], q[b+1])
    seq_lens: torch.Tensor  # [B] int32: context length including the new tokens
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]  # host copy, for host-side bookkeeping without a device sync
    # [programs, 2] int32: the prefill attention kernel's (request, query tile) per program (a mixed-step CUDA
    # graph's fixed grid, elastic.kernels.attention.prefill_tile_map); None: one program per tile of each request
    tile_map: torch.Tensor | None = None


@dataclass
class ForwardContext:
    attn: AttentionMetadata | None  # None: a profiling/dummy run with no KV cache
    record_expert_load: bool = True
    # [1] int64 on the device: rows at or past it are padding (CUDA-graph batches) and count no expert load.
    num_valid_tokens: torch.Tensor | None = None
    dp_num_tokens: list[int] | None = None  # tokens each DP rank runs this step (expert parallelism)
    # MoE layers run on their staged slots (the next layout's; elastic scaling captures its graphs beside
    # the live ones, from another thread).
    use_staged: bool = False
    # A CUDA-graph warm-up: expert-parallel collectives are replaced by local stand-ins of the same shapes,
    # so a rank warms up (and then captures) without waiting for the others.
    stand_in_collectives: bool = False


_local = threading.local()


def get_forward_context() -> ForwardContext:
    ctx = getattr(_local, "context", None)
    if ctx is None:
        raise RuntimeError("model forward called outside set_forward_context()")
    return ctx


@contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[None]:
    prev, _local.context = getattr(_local, "context", None), ctx
    try:
        yield
    finally:
        _local.context = prev
