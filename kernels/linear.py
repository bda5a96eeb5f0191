"""Linear layer y = x W^T (+ b): torch's (cuBLAS) in general, a Triton kernel for decode's skinny batches.

A decode step multiplies a few rows by each weight matrix: the layer reads its weight once and is bound by
memory. There cuBLAS reached 53-71% of the copy bandwidth (the 30B shape's q/k/v and output projections at one
row on H100; with the router 25.6 us a layer against 21.7 for this kernel; benchmarks/linear_kernel.py,
docs/performance.md "Session 11"), and its kernels take no programmatic dependent launch. `linear` runs up to
SKINNY_MAX_ROWS rows of bf16/fp16 through one Triton kernel (fp32 accumulation, PDL); everything else, and every
CPU tensor, through F.linear. ELASTIC_SKINNY_LINEAR=0 turns the kernel off (A/B timings, a way out).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import cdiv, next_pow2, pdl, use_triton

SKINNY_MAX_ROWS = 64
SKINNY_ENV = "ELASTIC_SKINNY_LINEAR"
_SKINNY_OFF = os.environ.get(SKINNY_ENV, "1") == "0"  # (read once, as _backend's PDL switch)
_TRITON_DTYPES = (torch.bfloat16, torch.float16)
# Output allocator; tests swap in a NaN-filling one to prove every element is written.
_alloc = torch.empty


def skinny_config(rows: int, out_features: int, in_features: int, device: torch.device | None = None
                  ) -> dict[str, int]:
    """Launch configuration, from a sweep on H100 (benchmarks/linear_kernel.py --sweep): BLOCK_M the rows (the
    tl.dot minimum of 16 up); wide outputs (q/k/v, lm_head) in 64-column blocks of 128-deep tiles, narrow ones
    (output and router projections) in 16-column blocks of deep tiles, so that every SM streams weight rows;
    as many pipeline stages (up to 5) as the GPU's shared memory holds."""
    block_m = max(16, next_pow2(rows))
    block_n = 64 if out_features >= 4096 else 16
    block_k = 128 if block_n == 64 else (512 if block_m <= 16 else 256)
    block_k = min(block_k, max(16, next_pow2(in_features)))
    stage_bytes = (block_m + block_n) * block_k * 2
    stages = max(2, min(5, _shared_memory(device) // stage_bytes))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4, "num_stages": stages}


@functools.lru_cache(maxsize=None)
def _shared_memory(device: torch.device | None) -> int:
    """Bytes of shared memory a kernel may use on `device`, less room for the compiler's own (CPU: H100's)."""
    if device is None or device.type != "cuda":
        return 224 << 10
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin - (16 << 10)


def uses_skinny(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    return (use_triton(x) and x.dim() == 2 and 0 < x.shape[0] <= SKINNY_MAX_ROWS and x.dtype in _TRITON_DTYPES
            and weight.dim() == 2 and weight.dtype == x.dtype and x.stride(-1) == 1 and weight.stride(-1) == 1
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())) and not _SKINNY_OFF)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           config: Optional[dict[str, int]] = None) -> torch.Tensor:
    """x [..., K], weight [N, K], bias [N] or None -> [..., N] in x's dtype (F.linear's contract). `config`
    overrides skinny_config (benchmarks)."""
    flat = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if not uses_skinny(flat, weight, bias):
        return F.linear(x, weight, bias)
    from .linear_triton import _skinny_linear_kernel

    M, K = flat.shape
    N = weight.shape[0]
    cfg = config or skinny_config(M, N, K, x.device)
    out = _alloc(M, N, dtype=x.dtype, device=x.device)
    _skinny_linear_kernel[(cdiv(N, cfg["BLOCK_N"]), cdiv(M, cfg["BLOCK_M"]))](
        flat, weight, bias if bias is not None else weight, out, M, N, K, flat.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], EVEN_K=K % cfg["BLOCK_K"] == 0, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **pdl(x))
    return out.view(*x.shape[:-1], N)
