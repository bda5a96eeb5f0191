"""Mixture-of-experts layer whose experts live in stacked *physical slots*.

A rank stores `slots_per_rank` slots; `physical_to_logical[slot]` says which checkpoint (logical) expert a
slot holds. Placement, replication and moves (EPLB, elastic scaling) only rewrite these maps and the
slot tensors; model code never changes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from elastic.forward_context import get_forward_context
from elastic.kernels import fused_moe
from elastic.kernels.routing import route_to_slots, slots_to_local

# (hidden [T, H], w13 [S, 2I, H], w2 [S, H, I], topk_weights [T, K] f32, topk_slots [T, K] int32) -> [T, H]
ExpertBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, ep_size: int = 1, ep_rank: int = 0, num_redundant: int = 0,
                 backend: ExpertBackend = fused_moe) -> None:
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
        # One kernel on CUDA: softmax/top-k, replica choice (token index % replica count), the
        # logical->physical gather, the expert-load count and the local-slot mask.
        load = self.expert_load if get_forward_context().record_expert_load else None
        topk_weights, physical, local = route_to_slots(
            router_logits, self.top_k, self.renormalize, self.logical_to_physical, self.logical_replica_count,
            load, self.first_slot, self.slots_per_rank)  # [T, K] f32, [T, K] int64 global, [T, K] int32
        if self.ep_comm is not None:
            return self.ep_comm(self, hidden, topk_weights, physical)
        return self.backend(hidden, self.w13, self.w2, topk_weights, local)

    def compute_local(self, hidden: torch.Tensor, topk_weights: torch.Tensor, physical: torch.Tensor) -> torch.Tensor:
        """Contributions of this rank's slots only. physical [N, K] global slot ids (-1: none)."""
        return self.backend(hidden, self.w13, self.w2, topk_weights,
                            slots_to_local(physical, self.first_slot, self.slots_per_rank))
