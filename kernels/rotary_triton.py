"""Triton kernel for neox rotary embedding, optionally after a per-head RMSNorm (imported lazily)."""
import triton
import triton.language as tl

from .pdl_triton import pdl_enter


@triton.jit
def _rotate_heads(x_ptr, o_ptr, w_ptr, t, stride_t, stride_h, o_stride_h, H, cos, sin, eps,
                  HALF: tl.constexpr, NORM: tl.constexpr, ROUND: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    # All H heads of token t as a [BLOCK_H, BLOCK_HALF] tile per half; cos/sin [1, BLOCK_HALF] fp32.
    # o_ptr: this token's first output head (heads o_stride_h apart); the result is rounded to ROUND, then
    # stored in o_ptr's dtype (a cache of another dtype gets what a rotated tensor copied into it would).
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < HALF
    mask = (offs_h < H)[:, None] & d_ok[None, :]
    src = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        # RMSNorm over each head's D = 2 * HALF values, rounded exactly where the torch code rounds:
        # normalised -> input dtype, times weight -> output dtype, then back to fp32 for the rotation.
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        x1 = (x1 * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32) * w1[None, :]
        x2 = (x2 * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32) * w2[None, :]
        x1 = x1.to(ROUND).to(tl.float32)
        x2 = x2.to(ROUND).to(tl.float32)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    dst = o_ptr + offs_h[:, None] * o_stride_h + offs_d[None, :]
    tl.store(dst, o1.to(ROUND).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, o2.to(ROUND).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy_heads(x_ptr, o_ptr, t, stride_t, stride_h, o_stride_h, H, D: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < H)[:, None] & (offs_d < D)[None, :]
    x = tl.load(x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :], mask=mask)
    tl.store(o_ptr + offs_h[:, None] * o_stride_h + offs_d[None, :], x.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_rotary_kernel(pos_ptr, q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
                      Hq, Hkv, stride_qt, stride_qh, stride_kt, stride_kh, eps,
                      v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
                      HALF: tl.constexpr, NORM: tl.constexpr, ROUND: tl.constexpr, STORE: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                      BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    # One program per token: its q heads and k heads share one cos/sin row. STORE: the rotated k heads and
    # the v heads go straight into the paged cache at the token's slot (none for slot < 0), not into ko_ptr.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < HALF
    cos = tl.load(cos_ptr + pos * HALF + offs_d, mask=d_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * HALF + offs_d, mask=d_ok, other=0.0)[None, :]
    _rotate_heads(q_ptr, qo_ptr + t * (Hq * 2 * HALF), qw_ptr, t, stride_qt, stride_qh, 2 * HALF, Hq, cos, sin,
                  eps, HALF, NORM, ROUND, BLOCK_HQ, BLOCK_HALF)
    if STORE:
        slot = tl.load(slot_ptr + t)
        if slot >= 0:  # (-1: a padding row, stored nowhere)
            row = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
            _rotate_heads(k_ptr, kc_ptr + row, kw_ptr, t, stride_kt, stride_kh, stride_ch, Hkv, cos, sin, eps,
                          HALF, NORM, ROUND, BLOCK_HKV, BLOCK_HALF)
            _copy_heads(v_ptr, vc_ptr + row, t, stride_vt, stride_vh, stride_ch, Hkv, 2 * HALF, BLOCK_HKV,
                        BLOCK_D)
    else:
        _rotate_heads(k_ptr, ko_ptr + t * (Hkv * 2 * HALF), kw_ptr, t, stride_kt, stride_kh, 2 * HALF, Hkv, cos,
                      sin, eps, HALF, NORM, ROUND, BLOCK_HKV, BLOCK_HALF)
