"""Peer-to-peer expert-parallel exchange: launchers of the Triton kernels in ep_p2p_triton.py.

Each rank owns three buffers that every rank of the group can read and write (symmetric memory mapped over
NVLink; the callers pass each buffer as a table of W raw addresses, one per rank):

    tokens   [W * cap, H]    rows from every rank, rank s's at [s * rows, (s + 1) * rows)
    meta     [W * cap, 2K]   f32: their slot ids (float) and routing weights, -1 slots on padding rows
    combine  [W * cap, H]    partial results for this rank's rows, rank s's at [s * rows, ...)
    pad      [W]             int64 barrier signals, one per rank

One MoE layer, `rows` = the step's largest per-rank token count (every rank knows it):
    dispatch   write my rows into every rank's tokens/meta at my block; barrier
    compute    my experts over all W * rows rows of my own tokens buffer (contiguous) -> partial
    combine    write partial's block d into rank d's combine at my block; barrier; sum my W blocks

Two barriers per layer are enough. A rank writes a peer's tokens only after the last layer's second barrier,
which the peer passed only after computing from them; it writes a peer's combine buffer only after this
layer's first barrier, which the peer reached only after summing the last layer's.
All launches are fixed-shape kernels with no host sync, so a decode step captures them in a CUDA graph.
"""
from __future__ import annotations

import torch

from ._backend import cdiv, next_pow2

_BLOCK_H = 1024


def p2p_dispatch(hidden: torch.Tensor, physical: torch.Tensor, weights: torch.Tensor, tokens_table: torch.Tensor,
                 meta_table: torch.Tensor, rows: int, rank: int) -> None:
    """hidden [T, H], physical [T, K] global slot ids, weights [T, K] f32 -> every rank's buffers (T <= rows)."""
    from .ep_p2p_triton import p2p_dispatch_kernel

    num_tokens, top_k = physical.shape
    world = tokens_table.shape[0]
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    p2p_dispatch_kernel[(rows, world)](
        hidden, physical.contiguous(), weights.float().contiguous(), tokens_table, meta_table, num_tokens, rows,
        rank, hidden.stride(0), H=hidden.shape[1], K=top_k, BLOCK_H=min(_BLOCK_H, next_pow2(hidden.shape[1])),
        BLOCK_K=next_pow2(top_k), num_warps=4)


def p2p_combine_push(partial: torch.Tensor, combine_table: torch.Tensor, rows: int, rank: int) -> None:
    """partial [W * rows, H]: block d -> rank d's combine buffer at this rank's block."""
    from .ep_p2p_triton import p2p_combine_push_kernel

    world = combine_table.shape[0]
    p2p_combine_push_kernel[(rows, world)](
        partial.contiguous(), combine_table, rows, rank, H=partial.shape[1],
        BLOCK_H=min(_BLOCK_H, next_pow2(partial.shape[1])), num_warps=4)


def p2p_combine_reduce(combine: torch.Tensor, num_tokens: int, rows: int, world: int) -> torch.Tensor:
    """This rank's combine buffer [W * cap, H] -> out [num_tokens, H]: the W blocks summed in rank order."""
    from .ep_p2p_triton import p2p_combine_reduce_kernel

    hidden_size = combine.shape[1]
    out = torch.empty(num_tokens, hidden_size, dtype=combine.dtype, device=combine.device)
    if num_tokens:
        block = min(_BLOCK_H, next_pow2(hidden_size))
        p2p_combine_reduce_kernel[(num_tokens, cdiv(hidden_size, block))](
            combine, out, rows, world, out.stride(0), H=hidden_size, BLOCK_H=block, num_warps=4)
    return out


def p2p_barrier(pad_table: torch.Tensor, sequence: torch.Tensor, abort: torch.Tensor, rank: int) -> None:
    """Wait (on the device) until every rank of the table reached this barrier, or `abort` [1] int32 is set."""
    from .ep_p2p_triton import p2p_barrier_kernel

    p2p_barrier_kernel[(1,)](pad_table, sequence, abort, rank, pad_table.shape[0], num_warps=1)
