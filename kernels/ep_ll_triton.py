"""Triton kernels of the peer-to-peer exchange's low-latency protocol, for steps of a few rows per rank (a lone
request, small batches; see ep_p2p.py for when it runs and why it is safe).

Every 8-byte word a rank writes into a peer carries 4 bytes of data in its low half and the exchange's 32-bit
sequence number in its high half (NCCL's "LL" idea). An aligned 8-byte store lands whole, so a peer that reads
the number it expects has the data beside it: it polls the data itself, and no fence and no separate signal
stand between a rank's stores and the peer's loads (the barrier protocol's system-scope release, then a flag to
poll, costs one more NVLink round trip per exchange). A word costs twice its data over the link: only for a
few rows. One program per rank does all of a kernel's work: its rows out, every peer's rows in, unpacked into
the plain buffers the experts and the norm read, then (dispatch) the experts' alignment.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ep_p2p_triton import dispatch_row, local_slots, peer, row_slots, row_total
from .moe_triton import align_in_one_program
from .pdl_triton import pdl_enter


@triton.jit
def _flag(n):
    # Exchange n's 32-bit flag, never 0: a word the buffer was zeroed with never passes for a new one.
    return (n % 4294967295 + 1).to(tl.int32)


@triton.jit
def _ll_words(data, flag):
    # data int32 [N] -> int64 words [N]: flag in the high half, the data's bits in the low half.
    return (flag.to(tl.int64) << 32) | data.to(tl.uint32).to(tl.int64)


@triton.jit
def _ll_receive(src, dst32, num_words, flag, abort, BLOCK_W: tl.constexpr):
    # Wait until every word of src [num_words] int64 carries `flag` (or the host raised `abort`), then copy their
    # data into dst32 [num_words] int32. Polled with volatile loads: each round re-reads the words still due.
    for w in range(0, num_words, BLOCK_W):
        offs = w + tl.arange(0, BLOCK_W)
        mask = offs < num_words
        word = tl.load(src + offs, mask=mask, other=0, volatile=True)
        due = mask & ((word >> 32).to(tl.int32) != flag)
        while (tl.max(due.to(tl.int32), axis=0) != 0) & (tl.load(abort, volatile=True) == 0):
            word = tl.where(due, tl.load(src + offs, mask=due, other=0, volatile=True), word)
            due = due & ((word >> 32).to(tl.int32) != flag)
        tl.store(dst32 + offs, word.to(tl.int32), mask=mask)


@triton.jit
def _send_row(hidden32, slots, weight, ll_tokens, ll_ids, ll_weights, row, dst, slots_per_rank, flag,
              stride_hidden32, H32: tl.constexpr, K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr):
    # One row's slot ids on rank dst (its own index, -1 elsewhere), weights and, where one of its experts is
    # there, the token: as flagged words into rank dst's receive buffers (rows of H32 / K words).
    k = tl.arange(0, BLOCK_K)
    local = local_slots(slots, dst, slots_per_rank, K, BLOCK_K)
    tl.store(ll_ids + k, _ll_words(local, flag), mask=k < K)
    tl.store(ll_weights + k, _ll_words(weight.to(tl.int32, bitcast=True), flag), mask=k < K)
    if tl.max(local, axis=0) >= 0:
        for w in range(0, H32, BLOCK_W):
            offs = w + tl.arange(0, BLOCK_W)
            data = tl.load(hidden32 + row * stride_hidden32 + offs, mask=offs < H32)
            tl.store(ll_tokens + offs, _ll_words(data, flag), mask=offs < H32)


@triton.jit
def _receive_row(r, tokens, ids, weights_out, ll_tokens, ll_ids, ll_weights, flag, abort, H32: tl.constexpr,
                 K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr):
    # A peer's row r (its ids and weights, then its token if one of them is among this rank's slots) from this
    # rank's receive words into its plain buffers.
    k = tl.arange(0, BLOCK_K)
    _ll_receive(ll_ids + r * K, ids + r * K, K, flag, abort, BLOCK_K)
    _ll_receive(ll_weights + r * K, (weights_out + r * K).to(tl.pointer_type(tl.int32)), K, flag, abort, BLOCK_K)
    tl.debug_barrier()  # the ids just stored, read back by every thread
    if tl.max(tl.load(ids + r * K + k, mask=k < K, other=-1), axis=0) >= 0:
        _ll_receive(ll_tokens + r * H32, tokens.to(tl.pointer_type(tl.int32)) + r * H32, H32, flag, abort, BLOCK_W)


@triton.jit(do_not_specialize=["num_tokens", "rows", "rank", "world", "slots_per_rank", "sync", "E",
                               "num_pairs", "num_slots", "num_blocks"])
def p2p_ll_dispatch_kernel(hidden, physical, weights, tokens, ids, weights_out, ll_tokens_table, ll_ids_table,
                           ll_weights_table, sequence, abort, num_tokens, rows, rank, world, slots_per_rank, sync,
                           stride_hidden, stride_hidden32, stride_physical, stride_weights, logits, stride_logits,
                           l2p, counts, load, valid, stride_l2p, E, cursor, sorted_ids, block_slot, num_pairs,
                           num_slots, num_blocks, H: tl.constexpr, H32: tl.constexpr, K: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                           ROUTE: tl.constexpr, RENORM: tl.constexpr, RECORD: tl.constexpr, HAS_VALID: tl.constexpr,
                           ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
                           BLOCK_B: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    # One program: this rank's rows (routed here with ROUTE, as p2p_dispatch_kernel does) to every peer as
    # flagged words and into its own plain buffers (tokens [W * rows, H], ids/weights_out [W * rows, K], at
    # row rank * rows + row); then every peer's rows in, unpacked there; then (ALIGN) the experts' alignment.
    # sync == 0: a CUDA-graph warm-up, this rank's own rows only.
    n = tl.load(sequence) + 1
    flag = _flag(n)
    hidden32 = hidden.to(tl.pointer_type(tl.int32))  # rows of H32 words, stride_hidden32 apart
    for row in range(0, rows):
        if row < num_tokens:
            slots, weight = row_slots(row, True, physical, weights, stride_physical, stride_weights, logits,
                                      stride_logits, l2p, counts, load, valid, stride_l2p, E, K, BLOCK_K, BLOCK_E,
                                      ROUTE, RENORM, RECORD, HAS_VALID)
        else:  # padding up to the step's largest rank: no expert, so it contributes nothing anywhere
            slots = tl.full((BLOCK_K,), -1, tl.int64)
            weight = tl.zeros((BLOCK_K,), tl.float32)
        out_row = rank * rows + row  # into this rank's own plain buffers as the barrier dispatch writes a peer's
        dispatch_row(hidden, slots, weight, tokens + out_row * H, weights_out + out_row * K, ids + out_row * K, row,
                     rank, slots_per_rank, stride_hidden, H, K, BLOCK_H, BLOCK_K)
        if sync != 0:
            for dst in range(0, world):
                if dst != rank:
                    _send_row(hidden32, slots, weight, peer(ll_tokens_table, dst, tl.int64) + out_row * H32,
                              peer(ll_ids_table, dst, tl.int64) + out_row * K,
                              peer(ll_weights_table, dst, tl.int64) + out_row * K, row, dst, slots_per_rank, flag,
                              stride_hidden32, H32, K, BLOCK_W, BLOCK_K)
    if sync != 0:
        for src in range(0, world):
            if src != rank:
                for row in range(0, rows):
                    _receive_row(src * rows + row, tokens, ids, weights_out, peer(ll_tokens_table, rank, tl.int64),
                                 peer(ll_ids_table, rank, tl.int64), peer(ll_weights_table, rank, tl.int64), flag,
                                 abort, H32, K, BLOCK_W, BLOCK_K)
        tl.store(sequence, n)  # (not in a warm-up, which exchanged nothing: the ranks' counts stay equal)
    if ALIGN:
        tl.debug_barrier()  # every rank's ids are in: every thread reads them
        align_in_one_program(ids, cursor, sorted_ids, block_slot, num_pairs, num_slots, num_blocks,
                             BLOCK_M, BLOCK, BLOCK_S, BLOCK_B)


@triton.jit
def _words_of(total, OUT: tl.constexpr, BLOCK_H: tl.constexpr):
    # total [BLOCK_H] in OUT (a 2- or 4-byte float) -> its bits as int32 words [BLOCK_H * size / 4].
    if OUT.primitive_bitwidth == 32:
        return total.to(tl.int32, bitcast=True)
    else:
        lo, hi = tl.split(tl.reshape(total, (BLOCK_H // 2, 2)))
        low = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16) | low


@triton.jit(do_not_specialize=["rows", "rank", "world", "sync"])
def p2p_ll_push_kernel(partial, pair_ids, combine, ll_combine_table, sequence, abort, rows, rank, world, sync,
                       H: tl.constexpr, H32: tl.constexpr, PAIRS: tl.constexpr, OUT: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    # One program: rows [dst * rows, (dst + 1) * rows) of this rank's results (row_total, as
    # p2p_combine_push_kernel sums them) go to rank dst as flagged words, or, its own, into
    # its plain combine buffer [W * rows, H] at row rank * rows + row; then every peer's results for this rank's
    # rows in, unpacked there (the norm after the layer sums the W blocks).
    n = tl.load(sequence) + 1
    flag = _flag(n)
    WORDS: tl.constexpr = BLOCK_H * OUT.primitive_bitwidth // 32
    for dst in range(0, world):
        if (dst == rank) | (sync != 0):
            for row in range(0, rows):
                src = (dst * rows + row).to(tl.int64)
                out_row = (rank * rows + row).to(tl.int64)
                for h in range(0, H, BLOCK_H):
                    offs = h + tl.arange(0, BLOCK_H)
                    total = row_total(partial, pair_ids, src, offs, H, PAIRS, BLOCK_P).to(OUT)
                    if dst == rank:
                        tl.store(combine + out_row * H + offs, total, mask=offs < H)
                    else:
                        words = h * OUT.primitive_bitwidth // 32 + tl.arange(0, WORDS)
                        target = peer(ll_combine_table, dst, tl.int64) + out_row * H32
                        tl.store(target + words, _ll_words(_words_of(total, OUT, BLOCK_H), flag), mask=words < H32)
    if sync != 0:
        # Every row, this rank's padding too: a rank without tokens must still hear from every peer before its
        # next dispatch rewrites their receive words (a peer may not have read this layer's yet).
        mine = peer(ll_combine_table, rank, tl.int64)
        combine32 = combine.to(tl.pointer_type(tl.int32))
        for src in range(0, world):
            if src != rank:
                for row in range(0, rows):
                    r = src * rows + row
                    _ll_receive(mine + r * H32, combine32 + r * H32, H32, flag, abort, BLOCK_H)
        tl.store(sequence, n)  # (not in a warm-up, which exchanged nothing: the ranks' counts stay equal)
