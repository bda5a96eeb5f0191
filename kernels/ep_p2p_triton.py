"""Triton kernels of the peer-to-peer expert-parallel exchange (see ep_p2p.py for the protocol).

Every rank maps every other rank's exchange buffer into its address space (symmetric memory over NVLink);
the kernels get those buffers as tables of raw addresses, one per rank, and read or write them like local
memory. Signals are int64 sequence numbers: a rank that reached barrier n stores n into every rank's pad,
then waits until its own pad shows n (or more) from every rank, or until the host raised the abort flag
(a dead peer must not leave the survivors spinning for ever).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _peer(table, rank, dtype: tl.constexpr):
    return tl.load(table + rank).to(tl.pointer_type(dtype))


@triton.jit
def p2p_dispatch_kernel(hidden, physical, weights, tokens_table, meta_table, num_tokens, rows, rank,
                        stride_hidden, H: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    # grid (rows, world): this rank's row `row` goes to rank `dst` at row rank * rows + row of its buffers.
    row = tl.program_id(0)
    dst = tl.program_id(1)
    out_row = (rank * rows + row).to(tl.int64)
    tokens = _peer(tokens_table, dst, hidden.dtype.element_ty)
    meta = _peer(meta_table, dst, tl.float32)
    k = tl.arange(0, BLOCK_K)
    if row < num_tokens:
        for h in range(0, H, BLOCK_H):
            offs = h + tl.arange(0, BLOCK_H)
            x = tl.load(hidden + row * stride_hidden + offs, mask=offs < H)
            tl.store(tokens + out_row * H + offs, x, mask=offs < H)
        # Slot ids travel as float32 beside the routing weights (exact below 2**24 slots).
        slot = tl.load(physical + row * K + k, mask=k < K).to(tl.float32)
        weight = tl.load(weights + row * K + k, mask=k < K)
        tl.store(meta + out_row * 2 * K + k, slot, mask=k < K)
        tl.store(meta + out_row * 2 * K + K + k, weight, mask=k < K)
    else:  # padding up to the step's largest rank: no expert, so it contributes nothing anywhere
        tl.store(meta + out_row * 2 * K + k, tl.full((BLOCK_K,), -1.0, tl.float32), mask=k < K)


@triton.jit
def p2p_combine_push_kernel(partial, combine_table, rows, rank, H: tl.constexpr, BLOCK_H: tl.constexpr):
    # grid (rows, world): rows [dst * rows, (dst + 1) * rows) of this rank's partial results belong to rank
    # `dst`; they land at rows [rank * rows, ...) of its combine buffer.
    row = tl.program_id(0)
    dst = tl.program_id(1)
    combine = _peer(combine_table, dst, partial.dtype.element_ty)
    src_row = (dst * rows + row).to(tl.int64)
    out_row = (rank * rows + row).to(tl.int64)
    for h in range(0, H, BLOCK_H):
        offs = h + tl.arange(0, BLOCK_H)
        x = tl.load(partial + src_row * H + offs, mask=offs < H)
        tl.store(combine + out_row * H + offs, x, mask=offs < H)


@triton.jit
def p2p_combine_reduce_kernel(combine, out, rows, world, stride_out, H: tl.constexpr, BLOCK_H: tl.constexpr):
    # grid (num_tokens, cdiv(H, BLOCK_H)): out[row] = sum over source ranks, in rank order, in float32.
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for src in range(world):
        acc += tl.load(combine + (src * rows + row).to(tl.int64) * H + offs, mask=offs < H).to(tl.float32)
    tl.store(out + row * stride_out + offs, acc.to(out.dtype.element_ty), mask=offs < H)


@triton.jit
def p2p_barrier_kernel(pad_table, sequence, abort, rank, world):
    # grid (1,), scalar code. `sequence` counts this rank's barriers on the device, so CUDA-graph replays
    # advance it too.
    n = tl.load(sequence) + 1
    tl.store(sequence, n)
    # Release: everything this rank wrote before (earlier kernels on this stream) is visible to a rank that
    # sees n. Tell every rank (itself too) that this rank reached barrier n.
    for peer in range(world):
        tl.atomic_xchg(_peer(pad_table, peer, tl.int64) + rank, n, sem="release", scope="sys")
    mine = _peer(pad_table, rank, tl.int64)
    for peer in range(world):
        seen = tl.atomic_add(mine + peer, 0, sem="acquire", scope="sys")
        stop = tl.load(abort, volatile=True)
        while (seen < n) & (stop == 0):
            seen = tl.atomic_add(mine + peer, 0, sem="acquire", scope="sys")
            stop = tl.load(abort, volatile=True)
