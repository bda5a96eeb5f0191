"""Mixture-of-experts layer whose experts live in stacked *physical slots*.

A rank stores `slots_per_rank` slots; `physical_to_logical[slot]` says which checkpoint (logical) expert a
slot holds. Placement, replication and moves (EPLB, elastic scaling) only rewrite these maps and the
slot tensors; model code never changes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from elastic.forward_context import get_forward_context

# (hidden [T, H], w13 [S, 2I, H], w2 [S, H, I], topk_weights [T, K] f32, topk_slots [T, K] int32) -> [T, H]
ExpertBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # router_logits [T, E] -> weights [T, K] f32, logical expert ids [T, K] int64
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_torch(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_slots: torch.Tensor) -> torch.Tensor:
    """Reference expert compute: (token, k) pairs sorted by slot, one matmul pair per slot that got tokens."""
    num_tokens, top_k = topk_slots.shape
    pair_slots = topk_slots.flatten().long()  # [T*K]
    pairs = torch.nonzero(pair_slots >= 0).flatten()  # pairs whose slot is on this rank
    pairs = pairs[torch.argsort(pair_slots[pairs], stable=True)]
    counts = torch.bincount(pair_slots[pairs], minlength=w13.shape[0]).tolist()
    pair_weights = topk_weights.flatten()
    inter = w2.shape[2]
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    start = 0
    for slot, count in enumerate(counts):
        if count == 0:
            continue
        chunk = pairs[start:start + count]
        tokens = chunk // top_k
        gate_up = hidden[tokens] @ w13[slot].t()  # [n, 2I]
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = (act @ w2[slot].t()).float() * pair_weights[chunk, None]  # [n, H]
        out.index_add_(0, tokens, y)
        start += count
    return out.to(hidden.dtype)


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, ep_size: int = 1, ep_rank: int = 0, num_redundant: int = 0,
                 backend: ExpertBackend = moe_torch) -> None:
        super().__init__()
        self.num_logical = num_experts
        self.num_physical = num_experts + num_redundant
        if self.num_physical % ep_size:
            raise ValueError(f"{self.num_physical} physical experts do not split evenly over {ep_size} ranks")
        self.top_k, self.renormalize, self.backend = top_k, renormalize, backend
        self.slots_per_rank = self.num_physical // ep_size
        self.first_slot = ep_rank * self.slots_per_rank
        self.w13 = nn.Parameter(torch.empty(self.slots_per_rank, 2 * intermediate_size, hidden_size),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.slots_per_rank, hidden_size, intermediate_size),
                               requires_grad=False)
        self.w13.weight_loader = self._load_expert
        self.w2.weight_loader = self._load_expert
        # Initial placement: logical e in slot e, extra slots replicate experts round-robin.
        physical_to_logical = torch.arange(self.num_physical) % num_experts
        self.register_buffer("physical_to_logical", physical_to_logical, persistent=False)
        self.register_buffer("logical_to_physical", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("logical_replica_count", torch.empty(0, dtype=torch.long), persistent=False)
        self.set_placement(physical_to_logical)
        # Tokens routed to each physical slot, accumulated on device (no host sync) for EPLB.
        self.register_buffer("expert_load", torch.zeros(self.num_physical, dtype=torch.long), persistent=False)
        # Set by elastic.distributed.expert_parallel when experts are spread over several ranks.
        self.ep_comm: Callable[[FusedMoE, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def set_placement(self, physical_to_logical: torch.Tensor) -> None:
        """Rebuild the logical->physical maps from a slot assignment [num_physical]."""
        p2l = physical_to_logical.to(torch.long).cpu()
        counts = torch.bincount(p2l, minlength=self.num_logical)
        if (counts == 0).any():
            raise ValueError(f"placement leaves experts {torch.nonzero(counts == 0).flatten().tolist()} without a slot")
        l2p = torch.full((self.num_logical, int(counts.max())), -1, dtype=torch.long)
        filled = [0] * self.num_logical
        for slot, expert in enumerate(p2l.tolist()):
            l2p[expert, filled[expert]] = slot
            filled[expert] += 1
        device = self.physical_to_logical.device
        self.physical_to_logical = p2l.to(device)
        self.logical_to_physical = l2p.to(device)
        self.logical_replica_count = counts.to(device)

    def _load_expert(self, param: nn.Parameter, loaded: torch.Tensor, expert_id: int, shard_id: int | None) -> None:
        """Copy one checkpoint expert's tensor into every local slot holding that expert.

        shard_id: 0 gate rows / 1 up rows of w13; None for w2 (down) or a whole fused gate_up tensor.
        """
        local = self.physical_to_logical[self.first_slot:self.first_slot + self.slots_per_rank]
        for slot in torch.nonzero(local == expert_id).flatten().tolist():
            target = param.data[slot]
            if shard_id is not None:
                half = target.shape[0] // 2
                target = target[shard_id * half:(shard_id + 1) * half]
            if target.shape != loaded.shape:
                raise ValueError(f"expert {expert_id}: shape {tuple(loaded.shape)} != expected {tuple(target.shape)}")
            target.copy_(loaded)

    def needs_expert(self, expert_id: int) -> bool:
        """Whether this rank stores a replica of `expert_id` (so the loader can skip reading the rest)."""
        local = self.physical_to_logical[self.first_slot:self.first_slot + self.slots_per_rank]
        return bool((local == expert_id).any())

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        # hidden [T, H]; router_logits [T, E] -> [T, H]
        topk_weights, topk_ids = route(router_logits, self.top_k, self.renormalize)
        # Replicas of one expert take tokens in turn (token index modulo replica count).
        token_index = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        replica = token_index % self.logical_replica_count[topk_ids]
        physical = self.logical_to_physical[topk_ids, replica]  # [T, K]
        if get_forward_context().record_expert_load:
            self.expert_load.index_add_(0, physical.flatten(), torch.ones_like(physical.flatten()))
        if self.ep_comm is not None:
            return self.ep_comm(self, hidden, topk_weights, physical)
        return self.compute_local(hidden, topk_weights, physical)

    def compute_local(self, hidden: torch.Tensor, topk_weights: torch.Tensor, physical: torch.Tensor) -> torch.Tensor:
        """Contributions of this rank's slots only. physical [N, K] global slot ids (-1: none)."""
        local = physical - self.first_slot
        local = torch.where((physical >= 0) & (local >= 0) & (local < self.slots_per_rank), local, -1)
        return self.backend(hidden, self.w13, self.w2, topk_weights, local.to(torch.int32))
