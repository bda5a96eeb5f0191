"""Neox-style rotary embedding (rotate halves), optionally fused with Qwen3's per-head q/k RMSNorm:
public API and torch references.

    x = [x1, x2] (halves of head_dim D);  out = [x1*cos - x2*sin, x2*cos + x1*sin]   (fp32 math)
with cos/sin [P, D/2] fp32 tables indexed by the token's position; the result is cast back to the
input dtype. qk_norm_rotary first applies RMSNorm over each head (norm in fp32, cast to the input
dtype, times weight [D]) and rotates the normed heads. On CUDA (bf16/fp16) either function is ONE
Triton kernel for q and k together, where the torch code spends ~20 (rotary) + ~16 (norms).
"""
from __future__ import annotations

import torch

from ._backend import next_pow2, use_triton
from .norm import rms_norm_reference

_TRITON_DTYPES = (torch.bfloat16, torch.float16)
# Output allocator; tests swap in a NaN-filling one to prove every element is written.
_alloc = torch.empty


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def apply_rotary_reference(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int64; q [T, Hq, D]; k [T, Hkv, D]; cos, sin [P, D/2] fp32 -> (q, k) rotated."""
    c = cos[positions].unsqueeze(1)                                  # [T, 1, D/2]
    s = sin[positions].unsqueeze(1)
    return _rotate_reference(q, c, s), _rotate_reference(k, c, s)


def qk_norm_rotary_reference(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm (weights [D]) of q [T, Hq, D] and k [T, Hkv, D], then apply_rotary."""
    q, k = rms_norm_reference(q, q_weight, eps), rms_norm_reference(k, k_weight, eps)
    return apply_rotary_reference(positions, q, k, cos, sin)


def _triton_ok(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, *weights: torch.Tensor) -> bool:
    T, _, D = q.shape
    return (use_triton(q) and T > 0 and D % 2 == 0 and q.dtype in _TRITON_DTYPES and k.dtype == q.dtype
            and k.shape[0] == T and k.shape[2] == D and positions.shape == (T,)
            and q.stride(-1) == 1 and k.stride(-1) == 1
            and cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape and cos.shape[1] == D // 2
            and all(w.dtype == weights[0].dtype and w.shape == (D,) and w.is_contiguous() for w in weights))


def _launch(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            weights: tuple[torch.Tensor, torch.Tensor] | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from .rotary_triton import _qk_rotary_kernel

    T, Hq, D = q.shape
    Hkv = k.shape[1]
    out_dtype = q.dtype if weights is None else torch.promote_types(q.dtype, weights[0].dtype)
    q_out = _alloc(T, Hq, D, dtype=out_dtype, device=q.device)
    k_out = _alloc(T, Hkv, D, dtype=out_dtype, device=q.device)
    qw, kw = weights if weights is not None else (q, k)             # dummies: never read without NORM
    cos, sin = cos.contiguous(), sin.contiguous()                    # no-ops for the layer's buffers
    block_h, block_half = next_pow2(max(Hq, Hkv)), next_pow2(D // 2)
    _qk_rotary_kernel[(T,)](
        positions, q, k, q_out, k_out, qw, kw, cos, sin, Hq, Hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), eps,
        HALF=D // 2, NORM=weights is not None, BLOCK_HQ=next_pow2(Hq), BLOCK_HKV=next_pow2(Hkv),
        BLOCK_HALF=block_half, num_warps=4 if block_h * block_half <= 2048 else 8)
    return q_out, k_out


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int64; q [T, Hq, D], k [T, Hkv, D] (heads/rows may be strided views of a fused
    qkv output); cos, sin [P, D/2] fp32 -> new contiguous (q, k) in the input dtype."""
    if not _triton_ok(positions, q, k, cos, sin):
        return apply_rotary_reference(positions, q, k, cos, sin)
    return _launch(positions, q, k, cos, sin, None, 0.0)


def qk_norm_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                   k_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (weights [D]) followed by apply_rotary, in one kernel on CUDA.
    Returns new contiguous (q, k) in promote(q.dtype, weight dtype)."""
    if not _triton_ok(positions, q, k, cos, sin, q_weight, k_weight):
        return qk_norm_rotary_reference(positions, q, k, q_weight, k_weight, eps, cos, sin)
    return _launch(positions, q, k, cos, sin, (q_weight, k_weight), eps)
