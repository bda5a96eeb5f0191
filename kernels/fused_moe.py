"""Fused MoE expert compute: public API and the torch reference that defines its semantics.

    out[t] = sum_{k : slots[t,k] >= 0} weights[t,k] * w2[s] @ (silu(g) * u),
             [g; u] = w13[s] @ hidden[t],   s = slots[t,k]

w13[s] stacks the gate projection (rows 0..I-1) on the up projection (rows I..2I-1). A slot < 0
means the expert is not stored on this rank; its term is skipped (a token with every slot < 0
gets zeros). Slots index the S physical expert slots of this rank.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from ._backend import use_triton
from .moe_config import MoEConfig, get_moe_config
from .routing import topk_route, topk_route_reference  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from .moe_triton import Alignment

# fp32 activations would make tl.dot fall back to TF32; they take the (exact) reference path.
_TRITON_DTYPES = (torch.bfloat16, torch.float16)


def _check_shapes(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> None:
    T, H = hidden.shape
    S, two_i, H1 = w13.shape
    assert H1 == H and two_i % 2 == 0, f"w13 {tuple(w13.shape)} vs hidden {tuple(hidden.shape)}"
    assert tuple(w2.shape) == (S, H, two_i // 2), f"w2 {tuple(w2.shape)}"
    assert topk_weights.shape == topk_slots.shape and topk_slots.shape[0] == T


def fused_moe_reference(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                        topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> torch.Tensor:
    """Torch reference (fp32 math, result in hidden's dtype). Pairs are sorted by slot and only
    slots that received tokens are visited, so the cost is proportional to the work."""
    _check_shapes(hidden, w13, w2, topk_weights, topk_slots)
    T, H = hidden.shape
    S, two_i, _ = w13.shape
    inter_size = two_i // 2
    K = topk_slots.shape[1]
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    flat_slots = topk_slots.reshape(-1).long()                    # [P]
    flat_w = topk_weights.reshape(-1).float()                     # [P]
    keep = (flat_slots >= 0) & (flat_slots < S)
    pairs = torch.nonzero(keep).squeeze(1)                        # [P'] pair ids
    order = torch.argsort(flat_slots[pairs], stable=True)
    pairs = pairs[order]
    slots, counts = torch.unique_consecutive(flat_slots[pairs], return_counts=True)
    x = hidden.float()
    start = 0
    for s, c in zip(slots.tolist(), counts.tolist()):
        p = pairs[start:start + c]                                # [c] pairs of slot s
        start += c
        tok = p // K
        gu = x[tok] @ w13[s].float().t()                          # [c, 2I]
        h = F.silu(gu[:, :inter_size]) * gu[:, inter_size:]       # [c, I]
        y = (h @ w2[s].float().t()) * flat_w[p, None]             # [c, H]
        out.index_add_(0, tok, y)
    return out.to(hidden.dtype)


def _prepared(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_slots: torch.Tensor,
              config: Optional[MoEConfig]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, MoEConfig]:
    """Row-major operands and the launch configuration of the Triton path."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
    if config is None:
        T, K = topk_slots.shape
        config = get_moe_config(T, K, w13.shape[0], w2.shape[2], hidden.dtype, hidden.device)
    return hidden, w13, w2, config


def fused_moe_pairs(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_slots: torch.Tensor,
                    aligned: Optional[Alignment] = None) -> Optional[torch.Tensor]:
    """fused_moe without its last step: -> pair_out [T*K, H] in hidden's dtype, row t*K+k holding
    weights[t,k] * expert(slots[t,k])(hidden[t]), for a caller that sums the pairs itself (the
    expert-parallel exchange, as it sends each token's sum back). Rows of pairs whose slot is < 0
    are NOT written: read only those with slots[t,k] >= 0. None where only the reference runs
    (fp32, no Triton): the caller then takes fused_moe's sums. `aligned`: topk_slots' alignment,
    done already by the kernel that wrote them (see pairs_alignment)."""
    _check_shapes(hidden, w13, w2, topk_weights, topk_slots)
    if not _pairs_on_triton(hidden.shape[0], hidden.dtype, hidden):
        return None
    from .moe_triton import fused_moe_pairs_triton

    hidden, w13, w2, config = _prepared(hidden, w13, w2, topk_slots, None)
    return fused_moe_pairs_triton(hidden, w13, w2, topk_weights.to(torch.float32).contiguous(),
                                  topk_slots.to(torch.int32).contiguous(), config, aligned)


def _pairs_on_triton(num_rows: int, dtype: torch.dtype, where: torch.Tensor) -> bool:
    return use_triton(where) and dtype in _TRITON_DTYPES and num_rows > 0


def pairs_alignment(num_rows: int, top_k: int, w13: torch.Tensor, w2: torch.Tensor,
                    dtype: torch.dtype) -> Optional[Alignment]:
    """Empty buffers of the alignment fused_moe_pairs would make for num_rows x top_k slot ids, for a kernel
    that writes those ids and aligns them as it ends (the expert-parallel dispatch: one launch fewer); None
    where fused_moe_pairs takes another path or its alignment spans several programs."""
    if not _pairs_on_triton(num_rows, dtype, w13):
        return None
    from .moe_triton import Alignment

    if not Alignment.fits_one_program(num_rows * top_k):  # a prefill chunk: its align spreads over programs
        return None
    config = get_moe_config(num_rows, top_k, w13.shape[0], w2.shape[2], dtype, w13.device)
    return Alignment.empty(num_rows * top_k, w13.shape[0], config["BLOCK_M"], w13.device)


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_slots: torch.Tensor,
              config: Optional[MoEConfig] = None,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """hidden [T, H], w13 [S, 2I, H], w2 [S, H, I], topk_weights [T, K] f32,
    topk_slots [T, K] int32 -> [T, H] in hidden's dtype.

    On CUDA (or under TRITON_INTERPRET=1) with Triton: sync-free Triton kernels, capturable in
    a CUDA graph. `config` overrides the tuned/heuristic launch configuration; `out` ([T, H],
    hidden's dtype) receives the result when given. Elsewhere: `fused_moe_reference`.
    """
    _check_shapes(hidden, w13, w2, topk_weights, topk_slots)
    if not use_triton(hidden) or hidden.dtype not in _TRITON_DTYPES:
        ref = fused_moe_reference(hidden, w13, w2, topk_weights, topk_slots)
        if out is None:
            return ref
        return out.copy_(ref)
    from .moe_triton import fused_moe_triton

    hidden, w13, w2, config = _prepared(hidden, w13, w2, topk_slots, config)
    return fused_moe_triton(hidden, w13, w2, topk_weights, topk_slots, config, out)
