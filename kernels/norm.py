"""RMSNorm (plain, fused with the residual add, per head): public API and torch references.

Semantics (the reference implementations' order, kept bit-for-bit on the CPU path):
    y = weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)
The fused variant first forms the residual stream in the model dtype, new_residual = residual + x,
then normalises it. On CUDA (bf16/fp16) each call is ONE Triton kernel; the reference spends
~8 (16 with the residual add) small kernels, which dominate decode under CUDA graphs.
"""
from __future__ import annotations

import torch

from ._backend import next_pow2, pdl, use_triton

_TRITON_DTYPES = (torch.bfloat16, torch.float16)
# Output allocator; tests swap in a NaN-filling one to prove every element is written.
_alloc = torch.empty


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N], weight [N] -> [..., N] in promote(x.dtype, weight.dtype)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def fused_add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, N] -> (rms_norm(residual + x), residual + x)."""
    residual = residual + x
    return rms_norm_reference(residual, weight, eps), residual


def sum_add_rms_norm_reference(blocks: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [P, rows, N] (rows >= T), residual [T, N] -> fused_add_rms_norm of x = the P blocks' first T rows
    summed in fp32 in block order, rounded once to blocks.dtype."""
    acc = torch.zeros(residual.shape, dtype=torch.float32, device=blocks.device)
    for block in blocks[:, :residual.shape[0]]:
        acc += block.float()
    return fused_add_rms_norm_reference(acc.to(blocks.dtype), residual, weight, eps)


def _triton_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (use_triton(x) and x.dtype in _TRITON_DTYPES and weight.dtype in _TRITON_DTYPES + (torch.float32,)
            and x.dim() in (2, 3) and x.numel() > 0 and x.stride(-1) == 1 and weight.is_contiguous())


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float, blocks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """blocks [P, rows, N]: x is their sum (x then only gives the shape [T, N] and dtype)."""
    from .norm_triton import _rms_norm_kernel

    x3 = x if x.dim() == 3 else x.unsqueeze(1)                      # [T, H, N] (H = 1 for [T, N])
    T, H, N = x3.shape
    assert weight.shape == (N,), f"weight {tuple(weight.shape)} vs rows of {N}"
    out = _alloc(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_in, res_out = x, x                                          # dummies when there is no residual
    if residual is not None:
        res_in, res_out = residual, _alloc(x.shape, dtype=x.dtype, device=x.device)
    source, stride_t, parts, stride_part = ((x3, x3.stride(0), 1, 0) if blocks is None
                                            else (blocks, blocks.stride(1), blocks.shape[0], blocks.stride(0)))
    block_n = next_pow2(N)
    _rms_norm_kernel[(T * H,)](
        source, res_in, weight, out, res_out, H, N, stride_t, x3.stride(1), res_in.stride(0), eps,
        parts, stride_part, HAS_RESIDUAL=residual is not None, SUM_PARTS=blocks is not None, BLOCK_N=block_n,
        num_warps=4 if block_n <= 1024 else 8, **pdl(x))
    return out, (res_out if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, N] (or [T, heads, N] for a per-head norm; rows may be strided), weight [N] -> a new
    contiguous tensor shaped like x, in promote(x.dtype, weight.dtype). One kernel on CUDA."""
    if not _triton_ok(x, weight):
        return rms_norm_reference(x, weight, eps)
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, N] -> (normed, new_residual = residual + x), both new contiguous tensors.
    One kernel on CUDA: the residual add, its store and the norm share a single read of x."""
    if (not _triton_ok(x, weight) or x.dim() != 2 or residual.shape != x.shape
            or residual.dtype != x.dtype or residual.stride(-1) != 1):
        return fused_add_rms_norm_reference(x, residual, weight, eps)
    normed, new_residual = _launch(x, residual, weight, eps)
    return normed, new_residual


def sum_add_rms_norm(blocks: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [P, rows, N] (rows >= T, each row contiguous), residual [T, N] -> fused_add_rms_norm(x, residual)
    with x = the blocks' first T rows summed (fp32, block order, rounded once to blocks.dtype; see
    sum_add_rms_norm_reference). One kernel on CUDA: an expert-parallel exchange's per-rank partial results
    summed where the next norm reads them, with no reduce kernel and no [T, N] tensor between."""
    if (not _triton_ok(residual, weight) or blocks.dim() != 3 or blocks.shape[2] != residual.shape[1]
            or blocks.shape[1] < residual.shape[0] or blocks.dtype != residual.dtype or blocks.stride(-1) != 1
            or residual.stride(-1) != 1):
        return sum_add_rms_norm_reference(blocks, residual, weight, eps)
    normed, new_residual = _launch(residual, residual, weight, eps, blocks=blocks)
    return normed, new_residual
