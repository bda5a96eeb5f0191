"""Triton RMSNorm kernel, optionally fused with the residual add (imported lazily: needs triton)."""
import triton
import triton.language as tl

from .pdl_triton import pdl_enter


@triton.jit(do_not_specialize=["parts"])
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, H, N,
                     stride_xt, stride_xh, stride_rt, eps, parts, stride_part,
                     HAS_RESIDUAL: tl.constexpr, SUM_PARTS: tl.constexpr, BLOCK_N: tl.constexpr,
                     USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    # One program per row (t, h) of x[T, H, N]; outputs are contiguous [T * H, N]. SUM_PARTS: x is `parts`
    # blocks stride_part apart (an expert-parallel combine buffer, one block per source rank), summed first in
    # fp32 in block order and rounded once to x's dtype, as the exchange's own reduce would.
    row = tl.program_id(0)
    t = (row // H).to(tl.int64)
    h = row % H
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    if SUM_PARTS:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for part in range(parts):
            acc += tl.load(x_ptr + part * stride_part + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
        x = acc.to(x_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + t * stride_xt + h * stride_xh + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + t * stride_rt + offs, mask=mask, other=0.0)
        # The residual stream lives in the model dtype: round the sum once, as torch's add does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + t * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    # Cast the normalised row to the input dtype BEFORE the weight multiply (reference order).
    y = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * N + offs, (y * w).to(out_ptr.dtype.element_ty), mask=mask)
