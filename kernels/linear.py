"""Linear layer y = x W^T (+ b): torch's (cuBLAS) in general, a Triton kernel for decode's skinny batches.

A decode step multiplies a few rows by each weight matrix: the layer reads its weight once and is bound by
memory. cuBLAS picks tiles for tall inputs there (on H200 the 30B shape's q/k/v, output and router projections
took ~22 us a layer at 1 to 64 rows, under half the copy bandwidth, benchmarks/linear_kernel.py), and its
kernels take no programmatic dependent launch. `linear` runs rows <= SKINNY_MAX_ROWS of bf16/fp16 through
one Triton kernel (fp32 accumulation, PDL); everything else, and every CPU tensor, through F.linear.
ELASTIC_SKINNY_LINEAR=0 turns the kernel off (A/B timings, a way out).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import cdiv, next_pow2, pdl, use_triton

SKINNY_MAX_ROWS = 64
SKINNY_ENV = "ELASTIC_SKINNY_LINEAR"
_TRITON_DTYPES = (torch.bfloat16, torch.float16)
# Output allocator; tests swap in a NaN-filling one to prove every element is written.
_alloc = torch.empty


def skinny_config(rows: int, out_features: int, in_features: int) -> dict[str, int]:
    """Launch configuration: BLOCK_M the rows (the tl.dot minimum of 16 up), BLOCK_N narrow enough that the
    grid covers every SM of a large GPU (132) about twice, BLOCK_K deep for many weight bytes in flight."""
    block_n = 16
    while block_n < 64 and cdiv(out_features, block_n * 2) >= 264:
        block_n *= 2
    return {"BLOCK_M": max(16, next_pow2(rows)), "BLOCK_N": block_n, "BLOCK_K": min(256, next_pow2(in_features)),
            "num_warps": 4, "num_stages": 4}


def uses_skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (use_triton(x) and x.dim() == 2 and 0 < x.shape[0] <= SKINNY_MAX_ROWS and x.dtype in _TRITON_DTYPES
            and weight.dtype == x.dtype and x.stride(-1) == 1 and weight.stride(-1) == 1
            and os.environ.get(SKINNY_ENV, "1") != "0")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           config: Optional[dict[str, int]] = None) -> torch.Tensor:
    """x [..., K], weight [N, K], bias [N] or None -> [..., N] in x's dtype (F.linear's contract). `config`
    overrides skinny_config (benchmarks)."""
    flat = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if not uses_skinny(flat, weight):
        return F.linear(x, weight, bias)
    from .linear_triton import _skinny_linear_kernel

    M, K = flat.shape
    N = weight.shape[0]
    cfg = config or skinny_config(M, N, K)
    out = _alloc(M, N, dtype=x.dtype, device=x.device)
    _skinny_linear_kernel[(cdiv(N, cfg["BLOCK_N"]), cdiv(M, cfg["BLOCK_M"]))](
        flat, weight, bias if bias is not None else weight, out, M, N, K, flat.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], EVEN_K=K % cfg["BLOCK_K"] == 0, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **pdl(x))
    return out.view(*x.shape[:-1], N)
