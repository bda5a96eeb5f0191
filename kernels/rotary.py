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

from ._backend import next_pow2, pdl, tl_dtype, use_triton
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
            weights: tuple[torch.Tensor, torch.Tensor] | None, eps: float,
            store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (q, k) rotated; with `store` = (v, k_cache, v_cache, slot_mapping), k goes into the cache (with v)
    instead: -> (q, None)."""
    from .rotary_triton import _qk_rotary_kernel

    T, Hq, D = q.shape
    Hkv = k.shape[1]
    out_dtype = q.dtype if weights is None else torch.promote_types(q.dtype, weights[0].dtype)
    q_out = _alloc(T, Hq, D, dtype=out_dtype, device=q.device)
    k_out = _alloc(T, Hkv, D, dtype=out_dtype, device=q.device) if store is None else q_out  # (unused if stored)
    qw, kw = weights if weights is not None else (q, k)             # dummies: never read without NORM
    v, k_cache, v_cache, slots = store if store is not None else (k, k, k, positions)  # dummies unless STORE
    cache_strides = k_cache.stride()[:3] if store is not None else (0, 0, 0)
    cos, sin = cos.contiguous(), sin.contiguous()                    # no-ops for the layer's buffers
    block_h, block_half = next_pow2(max(Hq, Hkv)), next_pow2(D // 2)
    _qk_rotary_kernel[(T,)](
        positions, q, k, q_out, k_out, qw, kw, cos, sin, Hq, Hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), eps,
        v, k_cache, v_cache, slots, v.stride(0), v.stride(1), *cache_strides,
        HALF=D // 2, NORM=weights is not None, ROUND=tl_dtype(out_dtype), STORE=store is not None,
        BLOCK_SIZE=k_cache.shape[1] if store is not None else 1, BLOCK_HQ=next_pow2(Hq),
        BLOCK_HKV=next_pow2(Hkv), BLOCK_HALF=block_half, BLOCK_D=next_pow2(D),
        num_warps=4 if block_h * block_half <= 2048 else 8, **pdl(q))
    return q_out, (k_out if store is None else None)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int64; q [T, Hq, D], k [T, Hkv, D] (heads/rows may be strided views of a fused
    qkv output); cos, sin [P, D/2] fp32 -> new contiguous (q, k) in the input dtype."""
    if not _triton_ok(positions, q, k, cos, sin):
        return apply_rotary_reference(positions, q, k, cos, sin)
    return _launch(positions, q, k, cos, sin, None, 0.0)  # type: ignore[return-value]


def qk_rotary_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                    eps: float = 0.0) -> torch.Tensor:
    """apply_rotary (or, with the per-head norm weights, qk_norm_rotary), then store_kvcache of the rotated k
    and of v [T, Hkv, D] into the paged caches [num_blocks, block_size, Hkv, D] at slot_mapping [T] (int64,
    -1: skipped) -> the rotated q. One Triton kernel on CUDA (the store kernel's work done by the rotary's
    program of each token), the references elsewhere; the cache gets exactly what the two steps store."""
    from .attention import store_kvcache

    weights = (q_weight, k_weight) if q_weight is not None else None
    if weights is None and k_weight is not None:
        raise ValueError("pass both per-head norm weights or neither")
    fused = (_triton_ok(positions, q, k, cos, sin, *(weights or ())) and v.shape == k.shape and v.stride(-1) == 1
             and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and k_cache.shape[2:] == k.shape[1:])
    if not fused:
        if weights is None:
            q, k = apply_rotary(positions, q, k, cos, sin)
        else:
            q, k = qk_norm_rotary(positions, q, k, q_weight, k_weight, eps, cos, sin)
        store_kvcache(k, v, k_cache, v_cache, slot_mapping)
        return q
    return _launch(positions, q, k, cos, sin, weights, eps, (v, k_cache, v_cache, slot_mapping))[0]


def qk_norm_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                   k_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (weights [D]) followed by apply_rotary, in one kernel on CUDA.
    Returns new contiguous (q, k) in promote(q.dtype, weight dtype)."""
    if not _triton_ok(positions, q, k, cos, sin, q_weight, k_weight):
        return qk_norm_rotary_reference(positions, q, k, q_weight, k_weight, eps, cos, sin)
    return _launch(positions, q, k, cos, sin, (q_weight, k_weight), eps)  # type: ignore[return-value]
