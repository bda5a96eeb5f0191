"""Triton kernels for multi-head latent attention over the paged latent cache (imported lazily: needs triton).

Cache layout per layer: [num_blocks, BLOCK_SIZE, C + R] (latent c_kv, then the rope key). Every head reads
the same rows, so a program owns BLOCK_H heads (and at prefill BLOCK_Q tokens) as the rows of its tiles: one
latent tile load serves them all, and the same tile is both the keys (with the rope part) and the values.
Decode splits the context over programs and merges with attention_triton's merge kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_triton import online_softmax_step, split_range, store_output, store_split_state
from .pdl_triton import pdl_enter


@triton.jit
def _store_latent_kernel(ckv_ptr, kpe_ptr, cache_ptr, slot_ptr, stride_ct, stride_pt, stride_cb, stride_cs, C, R,
                         BLOCK_SIZE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                         USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot < 0:                                   # padding token
        return
    row = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    offs_c = tl.arange(0, BLOCK_C)
    c = tl.load(ckv_ptr + t * stride_ct + offs_c, mask=offs_c < C)
    tl.store(row + offs_c, c.to(cache_ptr.dtype.element_ty), mask=offs_c < C)
    offs_p = tl.arange(0, BLOCK_P)
    p = tl.load(kpe_ptr + t * stride_pt + offs_p, mask=offs_p < R)
    tl.store(row + C + offs_p, p.to(cache_ptr.dtype.element_ty), mask=offs_p < R)


@triton.jit
def _attend_latent(q_lat, q_pe, lo, hi, q_pos, bt_row, cache_ptr, qk_scale, C, R, stride_cb, stride_cs,
                   BLOCK_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    # Keys lo..hi of one request for the tile's rows -> (acc [BLOCK_R, BLOCK_C], max, sum), log2 units.
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, BLOCK_P)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        page = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0)
        row = page.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs      # [BLOCK_N]
        latent = tl.load(cache_ptr + row[:, None] + offs_c[None, :], mask=n_ok[:, None] & (offs_c < C)[None, :],
                         other=0.0)                                                # [BLOCK_N, BLOCK_C]
        k_pe = tl.load(cache_ptr + row[:, None] + C + offs_p[None, :], mask=n_ok[:, None] & (offs_p < R)[None, :],
                       other=0.0)                                                  # [BLOCK_N, BLOCK_P]
        s = (tl.dot(q_lat, tl.trans(latent)) + tl.dot(q_pe, tl.trans(k_pe))) * qk_scale
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, latent)  # the latent is also the values
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["tiles_per_req", "num_splits"])
def _mla_fwd_kernel(ql_ptr, qp_ptr, cache_ptr, block_tables_ptr, qsl_ptr, seq_lens_ptr,
                    out_ptr, part_acc_ptr, part_ml_ptr,
                    qk_scale, tiles_per_req, num_splits, H, C, R,
                    stride_qlt, stride_qlh, stride_qpt, stride_qph, stride_ot, stride_oh,
                    stride_cb, stride_cs, stride_bt,
                    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT: tl.constexpr,
                    USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    pid0 = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    b = pid0 // tiles_per_req
    qt = pid0 % tiles_per_req
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if qt * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len                          # position of the request's first query
    # Keys past the tile's last query are causally invisible to every row: stop there.
    kv_end = tl.minimum(seq_len, ctx + tl.minimum(q_len, (qt + 1) * BLOCK_Q))
    lo = 0
    hi = kv_end
    offs_r = tl.arange(0, BLOCK_R)                 # row = (token qi, head) of this tile
    head = hb * BLOCK_H + offs_r % BLOCK_H
    if SPLIT:
        lo, hi = split_range(kv_end, num_splits, split, BLOCK_N)
        part = (b * H + head).to(tl.int64) * num_splits + split
        if lo >= hi:  # a context shorter than the splits: an empty state, which the merge weighs 0 (no acc)
            row_ok = (offs_r // BLOCK_H < 1) & (head < H)
            tl.store(part_ml_ptr + part * 2, tl.full([BLOCK_R], float("-inf"), tl.float32), mask=row_ok)
            tl.store(part_ml_ptr + part * 2 + 1, tl.zeros([BLOCK_R], tl.float32), mask=row_ok)
            return

    qi = offs_r // BLOCK_H
    q_idx = qt * BLOCK_Q + qi
    row_ok = (qi < BLOCK_Q) & (q_idx < q_len) & (head < H)
    q_pos = ctx + q_idx
    q_row = (q_start + q_idx).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, BLOCK_P)
    c_ok = offs_c < C
    p_ok = offs_p < R
    q_lat = tl.load(ql_ptr + q_row[:, None] * stride_qlt + head[:, None] * stride_qlh + offs_c[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)          # [BLOCK_R, BLOCK_C]
    q_pe = tl.load(qp_ptr + q_row[:, None] * stride_qpt + head[:, None] * stride_qph + offs_p[None, :],
                   mask=row_ok[:, None] & p_ok[None, :], other=0.0)           # [BLOCK_R, BLOCK_P]

    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    acc, m_i, l_i = _attend_latent(q_lat, q_pe, lo, hi, q_pos, bt_row, cache_ptr, qk_scale, C, R, stride_cb, stride_cs,
                                   BLOCK_SIZE, BLOCK_R, BLOCK_N, BLOCK_C, BLOCK_P)
    if SPLIT:  # decode has one query per request, so b is the token
        store_split_state(part_acc_ptr, part_ml_ptr, part, m_i, l_i, acc, row_ok, offs_c, c_ok, C)
    else:
        store_output(out_ptr, q_row, head, stride_ot, stride_oh, acc, l_i, row_ok, offs_c, c_ok)
