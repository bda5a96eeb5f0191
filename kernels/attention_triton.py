"""Triton kernels for the paged KV cache and paged attention (imported lazily: needs triton).

Cache layout per layer: [num_blocks, BLOCK_SIZE, Hkv, D]; token slot = block_id*BLOCK_SIZE + off.

One attention kernel serves prefill and decode. A program owns one kv head, BLOCK_Q query
tokens of one request and all G = Hq/Hkv query heads sharing that kv head: its rows are
(token, head) pairs, so every K/V tile is loaded once for the whole group and the tl.dot has
at least 16 rows even at decode (BLOCK_Q = 1). Decode additionally splits the context across
programs (flash-decoding) and merges the partial softmax states in a second kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .pdl_triton import pdl_enter

LOG2E = 1.4426950408889634


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cs, stride_ch, HKV, D,
                     BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot < 0:                                   # padding token
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < HKV)[:, None] & (offs_d < D)[None, :]       # [BLOCK_H, BLOCK_D]
    dst = blk * stride_cb + off * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(key_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :],
                mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :],
                mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attn_tile(acc, m_i, l_i, q, start, hi, q_pos, bt_row, k_cache_ptr, v_cache_ptr, kvh,
               qk_scale, D, stride_cb, stride_cs, stride_ch, BLOCK_SIZE: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
               EVEN_D: tl.constexpr):
    """One online-softmax step over keys start..start+BLOCK_N. MASKED: apply causal/end masks;
    otherwise every key is in range and visible to every row."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < hi
    if MASKED:
        page = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0)
    else:
        page = tl.load(bt_row + offs_n // BLOCK_SIZE)
    kv_off = (page.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs
              + kvh * stride_ch)                                      # [BLOCK_N]
    k_ptrs = k_cache_ptr + kv_off[:, None] + offs_d[None, :]         # [BLOCK_N, BLOCK_D]
    v_ptrs = v_cache_ptr + kv_off[:, None] + offs_d[None, :]
    if MASKED:
        kv_mask = n_ok[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=(offs_d < D)[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=(offs_d < D)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale                             # [BLOCK_R, BLOCK_N]
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
    return online_softmax_step(acc, m_i, l_i, s, v)


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, v):
    # Scores s [BLOCK_R, BLOCK_N] (log2 units, -inf where hidden) of the values v [BLOCK_N, BLOCK_D] folded
    # into the running (acc, max, sum) of every row.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)              # rows with no key yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _attend_range(acc, m_i, l_i, q, lo, hi, first_pos, q_pos, bt_row, k_cache_ptr, v_cache_ptr, kvh, qk_scale, D,
                  stride_cb, stride_cs, stride_ch, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, TWO_PHASE: tl.constexpr):
    full_end = lo
    if TWO_PHASE:
        # Keys up to the tile's first query position are visible to every row: those full
        # tiles skip all masking; only the diagonal / ragged-end tiles below are masked.
        full_end = lo + tl.maximum(tl.minimum(hi, first_pos + 1) - lo, 0) // BLOCK_N * BLOCK_N
        for start in range(lo, full_end, BLOCK_N):
            acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, start, hi, q_pos, bt_row, k_cache_ptr,
                                       v_cache_ptr, kvh, qk_scale, D, stride_cb, stride_cs,
                                       stride_ch, BLOCK_SIZE, BLOCK_N, BLOCK_D, False, EVEN_D)
    for start in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, start, hi, q_pos, bt_row, k_cache_ptr,
                                   v_cache_ptr, kvh, qk_scale, D, stride_cb, stride_cs,
                                   stride_ch, BLOCK_SIZE, BLOCK_N, BLOCK_D, True, EVEN_D)
    return acc, m_i, l_i


@triton.jit
def split_range(kv_end, num_splits, split, BLOCK_N: tl.constexpr):
    # Decode: this request's own context is divided evenly among the splits, on the device (a CUDA graph
    # replays any length; a split sized for the longest possible context would leave most programs idle).
    per_split = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    return lo, tl.minimum(lo + per_split, kv_end)


@triton.jit
def store_split_state(part_acc_ptr, part_ml_ptr, part, m_i, l_i, acc, row_ok, offs_d, d_ok, D):
    # Partial state of (request, head, split) rows `part` [BLOCK_R], for the merge kernel.
    tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    tl.store(part_acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def store_output(out_ptr, q_row, head, stride_ot, stride_oh, acc, l_i, row_ok, offs_d, d_ok):
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]          # a row without keys yields zeros
    tl.store(out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _request_tile(pid0, tile_map_ptr, tiles_per_req, TILE_MAP: tl.constexpr):
    # -> (request, tile of its queries) of program pid0: from the tile map [programs, 2] ((-1, -1): none), or
    # every request's tiles_per_req tiles in turn.
    if TILE_MAP:
        b = tl.load(tile_map_ptr + pid0 * 2)
        qt = tl.load(tile_map_ptr + pid0 * 2 + 1)
    else:
        b = pid0 // tiles_per_req
        qt = pid0 % tiles_per_req
    return b, qt


@triton.jit(do_not_specialize=["tiles_per_req", "num_splits"])
def _attn_fwd_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, qsl_ptr, seq_lens_ptr,
                     out_ptr, part_acc_ptr, part_ml_ptr, tile_map_ptr,
                     qk_scale, tiles_per_req, num_splits, HQ, G, D,
                     stride_qt, stride_qh, stride_ot, stride_oh,
                     stride_cb, stride_cs, stride_ch, stride_bt,
                     BLOCK_SIZE: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     EVEN_D: tl.constexpr, SPLIT: tl.constexpr, TWO_PHASE: tl.constexpr,
                     KV_FASTEST: tl.constexpr, TILE_MAP: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    if KV_FASTEST:        # programs of one token's kv heads run together: whole cache rows
        kvh = tl.program_id(0)
        pid0 = tl.program_id(1)
    else:
        pid0 = tl.program_id(0)
        kvh = tl.program_id(1)
    split = tl.program_id(2)
    b, qt = _request_tile(pid0, tile_map_ptr, tiles_per_req, TILE_MAP)
    if b < 0:             # a tile map's padding program
        return
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if qt * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len                          # position of the request's first query

    offs_r = tl.arange(0, BLOCK_R)                 # row = (token qi, head gh) of this tile
    qi = offs_r // G_PAD
    gh = offs_r % G_PAD
    q_idx = qt * BLOCK_Q + qi
    row_ok = (qi < BLOCK_Q) & (q_idx < q_len) & (gh < G)
    q_pos = ctx + q_idx                            # [BLOCK_R] absolute position
    head = kvh * G + gh
    q_row = (q_start + q_idx).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_D]

    # Keys past the tile's last query are causally invisible to every row: stop there.
    kv_end = tl.minimum(seq_len, ctx + tl.minimum(q_len, (qt + 1) * BLOCK_Q))
    lo = 0
    hi = kv_end
    if SPLIT:
        lo, hi = split_range(kv_end, num_splits, split, BLOCK_N)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)   # running max (log2 units)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, lo, hi, ctx + qt * BLOCK_Q, q_pos, bt_row, k_cache_ptr,
                                  v_cache_ptr, kvh, qk_scale, D, stride_cb, stride_cs, stride_ch, BLOCK_SIZE,
                                  BLOCK_N, BLOCK_D, EVEN_D, TWO_PHASE)

    if SPLIT:  # BLOCK_Q == 1 so b indexes the token
        part = (b * HQ + head).to(tl.int64) * num_splits + split      # [BLOCK_R]
        store_split_state(part_acc_ptr, part_ml_ptr, part, m_i, l_i, acc, row_ok, offs_d, d_ok, D)
    else:
        store_output(out_ptr, q_row, head, stride_ot, stride_oh, acc, l_i, row_ok, offs_d, d_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _attn_merge_kernel(part_acc_ptr, part_ml_ptr, out_ptr, qsl_ptr, HQ, num_splits, D,
                       stride_ot, stride_oh, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                       USE_PDL: tl.constexpr = False):
    """Merge the split-KV partial softmax states of one (request, q head) into the output."""
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == q_start:         # request without a query this step
        return
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    part = (b * HQ + h).to(tl.int64) * num_splits + offs_s           # [BLOCK_S]
    m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))   # empty splits weigh 0
    denom = tl.sum(l * w, axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # A split that saw no key may not have written its acc (the MLA decode kernel skips it): not read.
    acc = tl.load(part_acc_ptr + part[:, None] * D + offs_d[None, :],
                  mask=(s_ok & (l > 0.0))[:, None] & d_ok[None, :], other=0.0)     # [BLOCK_S, BLOCK_D]
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + h * stride_oh + offs_d,
             o.to(out_ptr.dtype.element_ty), mask=d_ok)
