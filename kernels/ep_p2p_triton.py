"""Triton kernels of the peer-to-peer expert-parallel exchange (see ep_p2p.py for the protocol and the
memory-ordering argument).

Every rank maps every other rank's exchange buffer into its address space (symmetric memory over NVLink);
the kernels get those buffers as tables of raw addresses, one per rank, and read or write them like local
memory. The dispatch and combine-push kernels end in the rank's barrier: every CTA counts itself on a local
arrival counter after its stores, and the CTA that arrives last runs the barrier for the whole kernel.
Signals are int64 sequence numbers: a rank that reached barrier n stores n into every other rank's pad, then
waits until its own pad shows n (or more) from every other rank, or until the host raised the abort flag (a
dead peer must not leave the survivors spinning for ever).

Runtime ints that differ between ranks (rank), steps (rows, num_tokens) or layouts (world, slots per rank)
are not specialized on: every rank and batch size runs one compiled variant per kernel and dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .moe_triton import align_in_one_program
from .pdl_triton import pdl_enter
from .routing_triton import physical_slots, softmax_topk


@triton.jit
def peer(table, rank, dtype: tl.constexpr):
    return tl.load(table + rank).to(tl.pointer_type(dtype))


@triton.jit
def _barrier(pad_table, sequence, passed, abort, rank, world):
    # Scalar code, run by one CTA of this rank. `sequence` counts this rank's barriers on the device, so
    # CUDA-graph replays advance it too; `passed` is its value, read when the kernel started (only the CTA
    # running a barrier writes it, and only after every other CTA of its grid is done).
    n = passed + 1
    tl.store(sequence, n)
    # Release: everything this CTA has observed (the kernel's stores, see _arrive) is visible to a rank that
    # sees n. Tell every other rank that this rank reached barrier n.
    for other in range(world):
        if other != rank:
            tl.atomic_xchg(peer(pad_table, other, tl.int64) + rank, n, sem="release", scope="sys")
    mine = peer(pad_table, rank, tl.int64)
    for other in range(world):
        if other != rank:
            # Every thread polls with plain volatile loads: an acquire atomic per round would pass its value
            # between the threads through shared memory and a CTA barrier, each round (2 x H100: ~1.5 us per
            # barrier). One acquire load of the value seen then synchronizes with the peer's release.
            seen = tl.load(mine + other, volatile=True)
            stop = tl.load(abort, volatile=True)
            while (seen < n) & (stop == 0):
                seen = tl.load(mine + other, volatile=True)
                stop = tl.load(abort, volatile=True)
            tl.atomic_add(mine + other, 0, sem="acquire", scope="sys")


@triton.jit
def _arrive(arrivals, pad_table, sequence, passed, abort, rank, world, sync):
    # Every CTA, after its stores: count it; the last CTA of the grid runs the barrier (when `sync`), so no
    # CTA ever waits for a CTA that may not be resident. bar.sync first: the stores of every thread of this
    # CTA precede (CTA scope) the one thread's release below. -> whether this CTA was the last.
    tl.debug_barrier()
    total = tl.num_programs(0) * tl.num_programs(1)
    # acq_rel at GPU scope: releases this CTA's stores; the last CTA's acquire reads the end of the RMW chain,
    # so it synchronizes with every earlier CTA's release, and its system-scope release in the barrier passes
    # them all on (causality is transitive across scopes). System scope here cost ~1.5 us per kernel.
    arrived = tl.atomic_add(arrivals, 1, sem="acq_rel", scope="gpu")
    last = arrived == total - 1
    if last:
        # Every other CTA of this grid has counted itself: reset for the next kernel on this stream (it
        # starts after this one ends; a reset on the device keeps CUDA-graph replays right).
        tl.store(arrivals, 0)
        if sync != 0:
            _barrier(pad_table, sequence, passed, abort, rank, world)
    return last


@triton.jit
def row_slots(row, count_load, physical, weights, stride_physical, stride_weights, logits, stride_logits, l2p, counts,
               load, valid, stride_l2p, E, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
               ROUTE: tl.constexpr, RENORM: tl.constexpr, RECORD: tl.constexpr, HAS_VALID: tl.constexpr):
    # Row `row`'s global slots [BLOCK_K] int64 (-1: none) and routing weights [BLOCK_K] f32: routed here from the
    # router's logits (ROUTE: routing.route_to_slots's math, one kernel fewer a layer), or the route kernel's.
    k = tl.arange(0, BLOCK_K)
    if ROUTE:
        offs_t = row + tl.arange(0, 1)
        mask = (offs_t >= 0)[:, None] & (k < K)[None, :]
        w, ids = softmax_topk(logits, offs_t, offs_t >= 0, E, stride_logits, K, RENORM, 1, BLOCK_E, BLOCK_K)
        phys = physical_slots(ids, offs_t, mask, l2p, counts, valid, stride_l2p, HAS_VALID)
        if RECORD:
            if count_load:  # each destination column's program routes the row; the first counts it
                tl.atomic_add(load + phys, tl.full((1, BLOCK_K), 1, tl.int64), mask=mask & (phys >= 0), sem="relaxed")
        slots = tl.reshape(phys, (BLOCK_K,))
        weight = tl.reshape(w, (BLOCK_K,))
    else:
        slots = tl.load(physical + row * stride_physical + k, mask=k < K, other=-1).to(tl.int64)
        weight = tl.load(weights + row * stride_weights + k, mask=k < K, other=0.0).to(tl.float32)
    return slots, weight


@triton.jit
def local_slots(slots, dst, slots_per_rank, K: tl.constexpr, BLOCK_K: tl.constexpr):
    # slots [BLOCK_K] global slot ids (-1: none) -> int32 [BLOCK_K]: rank dst's own index of each, -1 where the
    # slot is elsewhere. Rank dst holds slots [dst * slots_per_rank, (dst + 1) * slots_per_rank) (ExpertLayout);
    # computed by the sender, so the receiver's experts take them as they are (slots_to_local).
    k = tl.arange(0, BLOCK_K)
    local = slots.to(tl.int32) - dst * slots_per_rank
    return tl.where((k < K) & (local >= 0) & (local < slots_per_rank), local, -1)


@triton.jit
def dispatch_row(hidden, slots, weight, tokens, out_weights, out_ids, row, dst, slots_per_rank, stride_hidden,
                 H: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    # slots [BLOCK_K] global slot ids (-1: none), weight [BLOCK_K] f32 of a row -> tokens [H], out_weights [K]
    # f32, out_ids [K] int32: this row's place in rank `dst`'s buffers.
    k = tl.arange(0, BLOCK_K)
    local = local_slots(slots, dst, slots_per_rank, K, BLOCK_K)
    # The token itself only where one of its experts is: rank dst's experts read no other row (CUDA-graph
    # padding routes nowhere: a mixed step's bucket is mostly padding on a rank that only decodes).
    if tl.max(local, axis=0) >= 0:
        for h in range(0, H, BLOCK_H):
            offs = h + tl.arange(0, BLOCK_H)
            x = tl.load(hidden + row * stride_hidden + offs, mask=offs < H)
            tl.store(tokens + offs, x, mask=offs < H)
    tl.store(out_ids + k, local, mask=k < K)
    tl.store(out_weights + k, weight, mask=k < K)


@triton.jit
def row_total(partial, pair_ids, src, offs, H: tl.constexpr, PAIRS: tl.constexpr, BLOCK_P: tl.constexpr):
    # Columns `offs` of this rank's result for row src (int64): PAIRS > 1: the sum (fp32) of its PAIRS pair rows
    # of partial [rows * PAIRS, H] whose pair_ids >= 0 (the others were never written); PAIRS == 1: partial
    # [rows, H] holds the sums already (pair_ids unused).
    if PAIRS > 1:
        offs_p = tl.arange(0, BLOCK_P)
        pair = src * PAIRS + offs_p
        here = tl.load(pair_ids + pair, mask=offs_p < PAIRS, other=-1) >= 0
        vals = tl.load(partial + pair[:, None] * H + offs[None, :], mask=here[:, None] & (offs < H)[None, :],
                       other=0.0)
        return tl.sum(vals.to(tl.float32), axis=0)
    else:
        return tl.load(partial + src * H + offs, mask=offs < H, other=0.0)


@triton.jit(do_not_specialize=["num_tokens", "rows", "rank", "world", "slots_per_rank", "sync", "E",
                             "num_pairs", "num_slots", "num_blocks"])
def p2p_dispatch_kernel(hidden, physical, weights, tokens_table, weights_table, ids_table, pad_table, sequence,
                        arrivals, abort, num_tokens, rows, rank, world, slots_per_rank, sync, stride_hidden,
                        stride_physical, stride_weights, logits, stride_logits, l2p, counts, load, valid, stride_l2p,
                        E, ids_here, cursor, sorted_ids, block_slot, num_pairs, num_slots, num_blocks,
                        H: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_E: tl.constexpr, ROUTE: tl.constexpr, RENORM: tl.constexpr, RECORD: tl.constexpr,
                        HAS_VALID: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    passed = tl.load(sequence)  # now, off the barrier's path
    # grid (programs, world): this rank's row `row` goes to rank `dst` at row rank * rows + row of its buffers,
    # each program taking every programs-th row; then the barrier (the grid has a CTA even when rows == 0, so
    # every step passes it). ROUTE: the rows' slots and weights come from the router's logits here (each
    # destination's program routes the row; the first counts its load; physical and weights unused), else from
    # the route kernel's output (logits .. valid unused). ALIGN: the CTA that ran the barrier then aligns every
    # rank's slot ids now in this rank's buffer (ids_here, num_pairs of them) for the experts, as the fused
    # MoE's one-program align kernel would (cursor .. num_blocks, BLOCK_M .. BLOCK_B: its arguments).
    dst = tl.program_id(1)
    for row in range(tl.program_id(0), rows, tl.num_programs(0)):
        out_row = (rank * rows + row).to(tl.int64)
        slots = tl.full((BLOCK_K,), -1, tl.int64)  # padding up to the step's largest rank: no expert, no weight
        weight = tl.zeros((BLOCK_K,), tl.float32)
        if row < num_tokens:
            slots, weight = row_slots(row, dst == 0, physical, weights, stride_physical, stride_weights, logits,
                                      stride_logits, l2p, counts, load, valid, stride_l2p, E, K, BLOCK_K, BLOCK_E,
                                      ROUTE, RENORM, RECORD, HAS_VALID)
        dispatch_row(hidden, slots, weight, peer(tokens_table, dst, hidden.dtype.element_ty) + out_row * H,
                     peer(weights_table, dst, tl.float32) + out_row * K, peer(ids_table, dst, tl.int32) + out_row * K,
                     row, dst, slots_per_rank, stride_hidden, H, K, BLOCK_H, BLOCK_K)
    last = _arrive(arrivals, pad_table, sequence, passed, abort, rank, world, sync)
    if ALIGN:
        if last:
            tl.debug_barrier()  # every thread of the CTA reads after the barrier's acquire
            align_in_one_program(ids_here, cursor, sorted_ids, block_slot, num_pairs, num_slots, num_blocks,
                                 BLOCK_M, BLOCK, BLOCK_S, BLOCK_B)


@triton.jit(do_not_specialize=["rows", "rank", "world", "sync"])
def p2p_combine_push_kernel(partial, pair_ids, combine_table, pad_table, sequence, arrivals, abort, rows, rank, world,
                            sync, H: tl.constexpr, PAIRS: tl.constexpr, OUT: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_P: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    passed = tl.load(sequence)  # now, off the barrier's path
    # grid (programs, world): rows [dst * rows, (dst + 1) * rows) of this rank's results belong to rank `dst`;
    # they land, as OUT (the buffer's dtype), at rows [rank * rows, ...) of its combine buffer, each program
    # taking every programs-th row (summed over their pairs: row_total). Then the barrier.
    dst = tl.program_id(1)
    for row in range(tl.program_id(0), rows, tl.num_programs(0)):
        src = (dst * rows + row).to(tl.int64)
        combine = peer(combine_table, dst, OUT) + (rank * rows + row).to(tl.int64) * H
        for h in range(0, H, BLOCK_H):
            offs = h + tl.arange(0, BLOCK_H)
            total = row_total(partial, pair_ids, src, offs, H, PAIRS, BLOCK_P)
            tl.store(combine + offs, total.to(OUT), mask=offs < H)
    _arrive(arrivals, pad_table, sequence, passed, abort, rank, world, sync)


@triton.jit(do_not_specialize=["rows", "world"])
def p2p_combine_reduce_kernel(combine, out, rows, world, stride_out, H: tl.constexpr, BLOCK_H: tl.constexpr,
                              USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    # grid (num_tokens, cdiv(H, BLOCK_H)): out[row] = sum over source ranks, in rank order, in float32.
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for src in range(world):
        acc += tl.load(combine + (src * rows + row).to(tl.int64) * H + offs, mask=offs < H).to(tl.float32)
    tl.store(out + row * stride_out + offs, acc.to(out.dtype.element_ty), mask=offs < H)
