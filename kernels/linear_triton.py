"""Triton kernel of the skinny linear layer (decode batches: few rows, a weight read once; imported lazily)."""
import triton
import triton.language as tl

from .pdl_triton import pdl_enter


@triton.jit(do_not_specialize=["M"])
def _skinny_linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    # grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)): out[m, n] = x[m, :] . w[n, :] (+ b[n]), fp32 accumulation.
    # Every program walks the whole K of its BLOCK_N weight rows: each weight byte is read once, by one
    # program, and the grid's many narrow column blocks keep every SM streaming weights.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + offs_k
        if EVEN_K:
            x = tl.load(x_rows + ks[None, :], mask=m_ok[:, None], other=0.0)      # [BLOCK_M, BLOCK_K]
            w = tl.load(w_rows + ks[:, None], mask=n_ok[None, :], other=0.0)      # [BLOCK_K, BLOCK_N]
        else:
            x = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & (ks < K)[None, :], other=0.0)
            w = tl.load(w_rows + ks[:, None], mask=n_ok[None, :] & (ks < K)[:, None], other=0.0)
        acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
