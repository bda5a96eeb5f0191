"""Top-k routing: softmax over experts in fp32, top-k, optional renormalisation; and the mapping of
the chosen logical experts to physical expert slots (replicas, this rank's local slots)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backend import cdiv, next_pow2, pdl, use_triton

# Output allocator of route_to_slots; tests swap in a NaN/huge-filling one.
_alloc = torch.empty


def topk_route_reference(router_logits: torch.Tensor, top_k: int,
                         renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, K] f32, ids [T, K] int32), descending weights."""
    probs = torch.softmax(router_logits.float(), dim=-1)           # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)                # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def _block_t(T: int, E: int) -> int:
    return max(1, min(16, 4096 // next_pow2(E), next_pow2(T)))


def _warps(block_t: int, E: int) -> int:
    """Warps of a routing program: one for a decode token's few hundred logits, so that its top-k rounds reduce
    within a warp (no shared memory between warps), up to 4 for 16 tokens of many experts."""
    return max(1, min(4, block_t * next_pow2(E) // 512))


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
    block_t = _block_t(T, E)
    _topk_route_kernel[(cdiv(T, block_t),)](
        router_logits, weights, ids, T, E, router_logits.stride(0), TOP_K=top_k,
        RENORM=renormalize, BLOCK_T=block_t, BLOCK_E=next_pow2(E), BLOCK_K=next_pow2(top_k),
        num_warps=_warps(block_t, E), **pdl(router_logits))
    return weights, ids


def slots_to_local(physical: torch.Tensor, first_slot: int, slots_per_rank: int) -> torch.Tensor:
    """Global slot ids [N, K] (-1: none) -> this rank's slot index [N, K] int32, -1 where the slot
    is not in [first_slot, first_slot + slots_per_rank)."""
    local = physical - first_slot
    local = torch.where((physical >= 0) & (local >= 0) & (local < slots_per_rank), local, -1)
    return local.to(torch.int32)


def grouped_topk_reference(router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring_func: str = "softmax",
                           score_bias: torch.Tensor | None = None, num_groups: int = 1, topk_groups: int = 1,
                           group_score: str = "max", scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek routing. router_logits [T, E] -> (weights [T, K] f32, ids [T, K] int32).

    scores = softmax (V2) or sigmoid (V3) of the fp32 logits; the choice ranks scores + score_bias [E]
    (V3's e_score_correction_bias) but the weights are the unbiased scores. With num_groups > 1 the experts
    form equal groups ranked by their best score ("max", V2 group_limited_greedy) or their two best ("top2_sum",
    V3), and only the best topk_groups groups are eligible. Weights are renormalised when asked, then
    multiplied by `scaling` (routed_scaling_factor)."""
    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring_func == "softmax" else torch.sigmoid(logits)
    choice = scores if score_bias is None else scores + score_bias.float()
    if num_groups > 1:
        T, E = choice.shape
        per_group = choice.view(T, num_groups, E // num_groups)
        if group_score == "top2_sum":
            ranked = per_group.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            ranked = per_group.max(dim=-1).values                      # [T, G]
        keep = torch.zeros_like(ranked, dtype=torch.bool)
        keep.scatter_(1, ranked.topk(topk_groups, dim=-1)[1], True)
        eligible = keep[:, :, None].expand(T, num_groups, E // num_groups).reshape(T, E)  # no host sync
        choice = choice.masked_fill(~eligible, float("-inf"))
    ids = choice.topk(top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling != 1.0:
        weights = weights * scaling
    return weights, ids.to(torch.int32)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def grouped_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring_func: str = "softmax",
                 score_bias: torch.Tensor | None = None, num_groups: int = 1, topk_groups: int = 1,
                 group_score: str = "max", scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """See grouped_topk_reference. One Triton kernel on CUDA (graph-capturable) when the experts and groups
    are powers of two (V3's 256 in 8, V2-Lite's 64), the torch reference elsewhere (V2's 160 experts: ~15 small
    ops, still sync-free and graph-capturable)."""
    T, E = router_logits.shape
    if (not use_triton(router_logits) or T == 0 or E > 1024 or not _is_pow2(E) or not _is_pow2(num_groups)
            or num_groups > E or (group_score == "top2_sum" and E // num_groups < 2)):
        return grouped_topk_reference(router_logits, top_k, renormalize, scoring_func, score_bias, num_groups,
                                      topk_groups, group_score, scaling)
    from .routing_triton import _grouped_topk_kernel

    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    weights = _alloc(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = _alloc(T, top_k, dtype=torch.int32, device=router_logits.device)
    bias = score_bias.contiguous() if score_bias is not None else weights   # dummy: never read without HAS_BIAS
    block_t = _block_t(T, E)
    _grouped_topk_kernel[(cdiv(T, block_t),)](
        router_logits, bias, weights, ids, T, router_logits.stride(0), float(scaling), TOP_K=top_k,
        RENORM=renormalize, SIGMOID=scoring_func == "sigmoid", HAS_BIAS=score_bias is not None,
        GROUPS=num_groups, TOPK_GROUPS=topk_groups, TOP2=group_score == "top2_sum", BLOCK_T=block_t, E=E,
        BLOCK_K=next_pow2(top_k), num_warps=4, **pdl(router_logits))
    return weights, ids


def ids_to_slots_reference(ids: torch.Tensor, logical_to_physical: torch.Tensor,
                           logical_replica_count: torch.Tensor, expert_load: torch.Tensor | None, first_slot: int,
                           slots_per_rank: int, num_valid: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """See ids_to_slots."""
    ids = ids.long()
    # Replicas of one expert take tokens in turn (token index modulo replica count).
    token_index = torch.arange(ids.shape[0], device=ids.device)[:, None]
    replica = token_index % logical_replica_count[ids]
    physical = logical_to_physical[ids, replica]                  # [T, K]
    if num_valid is not None:  # CUDA-graph padding rows: no slot (no expert work, no load)
        physical = torch.where(token_index < num_valid.to(ids.device), physical, -1)
    if expert_load is not None:
        counted = physical.flatten()
        expert_load.index_add_(0, counted.clamp(min=0), (counted >= 0).long())
    return physical, slots_to_local(physical, first_slot, slots_per_rank)


def ids_to_slots(ids: torch.Tensor, logical_to_physical: torch.Tensor, logical_replica_count: torch.Tensor,
                 expert_load: torch.Tensor | None, first_slot: int, slots_per_rank: int,
                 num_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot half of route_to_slots for expert ids chosen elsewhere (grouped_topk): ids [T, K] ->
    (physical [T, K] int64, local [T, K] int32), counting expert_load as route_to_slots does.
    One Triton kernel on CUDA (graph-capturable), the torch reference elsewhere."""
    T, K = ids.shape
    if not use_triton(ids) or T == 0:
        return ids_to_slots_reference(ids, logical_to_physical, logical_replica_count, expert_load, first_slot,
                                      slots_per_rank, num_valid)
    from .routing_triton import _ids_to_slots_kernel

    assert logical_to_physical.dtype == logical_replica_count.dtype == torch.int64
    assert expert_load is None or (expert_load.dtype == torch.int64 and expert_load.is_contiguous())
    if ids.stride(-1) != 1:
        ids = ids.contiguous()
    l2p = logical_to_physical if logical_to_physical.stride(-1) == 1 else logical_to_physical.contiguous()
    counts = logical_replica_count.contiguous()
    physical = _alloc(T, K, dtype=torch.int64, device=ids.device)
    local = _alloc(T, K, dtype=torch.int32, device=ids.device)
    block_t = max(1, min(64, next_pow2(T)))
    _ids_to_slots_kernel[(cdiv(T, block_t),)](
        ids, physical, local, l2p, counts,
        expert_load if expert_load is not None else physical,      # dummy: never touched unless RECORD
        num_valid if num_valid is not None else counts,            # dummy: never read unless HAS_VALID
        T, ids.stride(0), l2p.stride(0), first_slot, slots_per_rank, TOP_K=K, RECORD=expert_load is not None,
        HAS_VALID=num_valid is not None, BLOCK_T=block_t, BLOCK_K=next_pow2(K), num_warps=4, **pdl(ids))
    return physical, local


def route_to_slots_reference(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                             logical_to_physical: torch.Tensor, logical_replica_count: torch.Tensor,
                             expert_load: torch.Tensor | None, first_slot: int, slots_per_rank: int,
                             num_valid: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See route_to_slots."""
    weights, ids = topk_route_reference(router_logits, top_k, renormalize)
    physical, local = ids_to_slots_reference(ids, logical_to_physical, logical_replica_count, expert_load,
                                             first_slot, slots_per_rank, num_valid)
    return weights, physical, local


def route_to_slots(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                   logical_to_physical: torch.Tensor, logical_replica_count: torch.Tensor,
                   expert_load: torch.Tensor | None, first_slot: int, slots_per_rank: int,
                   num_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens to physical expert slots.

    router_logits [T, E]; logical_to_physical [E, R] int64 (replica r of expert e; -1 padding);
    logical_replica_count [E] int64; expert_load [num_physical] int64 or None.
    -> (weights [T, K] f32 (topk_route's), physical [T, K] int64 global slot ids
        = logical_to_physical[e, t % logical_replica_count[e]],
        local [T, K] int32 = physical - first_slot inside this rank's slots, else -1).
    When expert_load is given, 1 is added to expert_load[physical] per (token, k) (atomics on CUDA).
    num_valid ([1] int64 on the device): rows t >= num_valid[0] are CUDA-graph padding and go to no slot
    (physical and local -1): no expert computes them, no rank is sent them, they count no load.
    One Triton kernel on CUDA (graph-capturable), the torch reference elsewhere.
    """
    T, E = router_logits.shape
    if not use_triton(router_logits) or E > 4096 or T == 0:
        return route_to_slots_reference(router_logits, top_k, renormalize, logical_to_physical,
                                        logical_replica_count, expert_load, first_slot, slots_per_rank, num_valid)
    from .routing_triton import _route_to_slots_kernel

    assert logical_to_physical.dim() == 2 and logical_to_physical.shape[0] == E
    assert logical_to_physical.dtype == logical_replica_count.dtype == torch.int64
    assert expert_load is None or (expert_load.dtype == torch.int64 and expert_load.is_contiguous())
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    l2p = logical_to_physical if logical_to_physical.stride(-1) == 1 else logical_to_physical.contiguous()
    counts = logical_replica_count.contiguous()
    dev = router_logits.device
    weights = _alloc(T, top_k, dtype=torch.float32, device=dev)
    physical = _alloc(T, top_k, dtype=torch.int64, device=dev)
    local = _alloc(T, top_k, dtype=torch.int32, device=dev)
    block_t = _block_t(T, E)
    _route_to_slots_kernel[(cdiv(T, block_t),)](
        router_logits, weights, physical, local, l2p, counts,
        expert_load if expert_load is not None else physical,      # dummy: never touched unless RECORD
        num_valid if num_valid is not None else counts,            # dummy: never read unless HAS_VALID
        T, E, router_logits.stride(0), l2p.stride(0), first_slot, slots_per_rank,
        TOP_K=top_k, RENORM=renormalize, RECORD=expert_load is not None, HAS_VALID=num_valid is not None,
        BLOCK_T=block_t,
        BLOCK_E=next_pow2(E), BLOCK_K=next_pow2(top_k), num_warps=_warps(block_t, E),
        **pdl(router_logits))
    return weights, physical, local


@dataclass(frozen=True)
class RouterInputs:
    """What route_to_slots reads (the softmax top-k), for a kernel that routes its rows itself as it goes (the
    peer-to-peer dispatch: one launch a layer fewer). logits [T, E]; logical_to_physical [E, R] int64;
    replica_count [E] int64; expert_load [num_physical] int64 or None; num_valid [1] int64 or None."""

    logits: torch.Tensor
    top_k: int
    renormalize: bool
    logical_to_physical: torch.Tensor
    replica_count: torch.Tensor
    expert_load: torch.Tensor | None = None
    num_valid: torch.Tensor | None = None

    def route(self, first_slot: int = 0, slots_per_rank: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """route_to_slots of these inputs -> (weights [T, K] f32, physical [T, K] int64, local [T, K] int32)."""
        return route_to_slots(self.logits, self.top_k, self.renormalize, self.logical_to_physical, self.replica_count,
                              self.expert_load, first_slot, slots_per_rank, num_valid=self.num_valid)
