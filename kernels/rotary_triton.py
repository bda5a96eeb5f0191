"""Triton kernel for neox rotary embedding, optionally after a per-head RMSNorm (imported lazily)."""
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, o_ptr, w_ptr, t, stride_t, stride_h, H, cos, sin, eps,
                  HALF: tl.constexpr, NORM: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    # All H heads of token t as a [BLOCK_H, BLOCK_HALF] tile per half; cos/sin [1, BLOCK_HALF] fp32.
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
        x1 = x1.to(o_ptr.dtype.element_ty).to(tl.float32)
        x2 = x2.to(o_ptr.dtype.element_ty).to(tl.float32)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    dst = o_ptr + t * (H * 2 * HALF) + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    tl.store(dst, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, o2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_rotary_kernel(pos_ptr, q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
                      Hq, Hkv, stride_qt, stride_qh, stride_kt, stride_kh, eps,
                      HALF: tl.constexpr, NORM: tl.constexpr, BLOCK_HQ: tl.constexpr,
                      BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One program per token: its q heads and k heads share one cos/sin row.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < HALF
    cos = tl.load(cos_ptr + pos * HALF + offs_d, mask=d_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * HALF + offs_d, mask=d_ok, other=0.0)[None, :]
    _rotate_heads(q_ptr, qo_ptr, qw_ptr, t, stride_qt, stride_qh, Hq, cos, sin, eps,
                  HALF, NORM, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, ko_ptr, kw_ptr, t, stride_kt, stride_kh, Hkv, cos, sin, eps,
                  HALF, NORM, BLOCK_HKV, BLOCK_HALF)
