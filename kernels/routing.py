"""Top-k routing: softmax over experts in fp32, top-k, optional renormalisation."""
from __future__ import annotations

import torch

from ._backend import cdiv, next_pow2, use_triton


def topk_route_reference(router_logits: torch.Tensor, top_k: int,
                         renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, K] f32, ids [T, K] int32), descending weights."""
    probs = torch.softmax(router_logits.float(), dim=-1)           # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)                # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def topk_route(router_logits: torch.Tensor, top_k: int,
               renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, K] f32, ids [T, K] int32), descending weights.
    One Triton kernel on CUDA (graph-capturable), the torch reference elsewhere."""
    T, E = router_logits.shape
    if not use_triton(router_logits) or E > 4096 or T == 0:
        return topk_route_reference(router_logits, top_k, renormalize)
    from .routing_triton import _topk_route_kernel

    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    dev = router_logits.device
    weights = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=dev)
    block_e = next_pow2(E)
    block_t = max(1, min(16, 4096 // block_e, next_pow2(T)))
    _topk_route_kernel[(cdiv(T, block_t),)](
        router_logits, weights, ids, T, E, router_logits.stride(0), TOP_K=top_k,
        RENORM=renormalize, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=next_pow2(top_k),
        num_warps=4)
    return weights, ids
