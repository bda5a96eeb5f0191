"""Mixture-of-experts layer whose experts live in stacked *physical slots*.

A rank stores `slots_per_rank` slots; `physical_to_logical[slot]` says which checkpoint (logical) expert a
slot holds. Placement, replication and moves (EPLB, elastic scaling) only rewrite these maps and the
slot tensors; model code never changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from elastic.forward_context import get_forward_context
from elastic.kernels import fused_moe
from elastic.kernels.routing import ids_to_slots, route_to_slots, slots_to_local

# A model's own expert choice (e.g. DeepSeek's grouped top-k): router_logits [T, E] -> (weights [T, K] f32,
# logical ids [T, K]); FusedMoE maps the ids to physical slots as for the built-in softmax top-k.
TopkRouter = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

def placement_maps(physical_to_logical: torch.Tensor, num_logical: int,
                   max_replicas: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slot assignment [S] -> (p2l [S], l2p [E, max_replicas] -1 padded, replica counts [E]), on the CPU."""
    p2l = physical_to_logical.to(torch.long).cpu()
    if p2l.numel() and (p2l.min() < 0 or p2l.max() >= num_logical):
        raise ValueError(f"placement names experts outside [0, {num_logical})")
    counts = torch.bincount(p2l, minlength=num_logical)
    if (counts == 0).any():
        raise ValueError(f"placement leaves experts {torch.nonzero(counts == 0).flatten().tolist()} without a slot")
    if int(counts.max()) > max_replicas:
        raise ValueError(f"placement gives an expert {int(counts.max())} replicas; at most {max_replicas} fit")
    # Explicitly on the CPU: the model is built under a `torch.device` context that would move these.
    l2p = torch.full((num_logical, max_replicas), -1, dtype=torch.long, device="cpu")
    order = torch.argsort(p2l, stable=True)  # slots grouped by expert, ascending within each
    starts = torch.cumsum(counts, 0) - counts
    replica = torch.arange(p2l.numel(), device="cpu") - starts[p2l[order]]
    l2p[p2l[order], replica] = order
    return p2l, l2p, counts


# (hidden [T, H], w13 [S, 2I, H], w2 [S, H, I], topk_weights [T, K] f32, topk_slots [T, K] int32) -> [T, H]
ExpertBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertLayout:
    """How one MoE layer's physical slots spread over the EP group. Slots per rank are ceil((E + R) / ranks),
    so any number of ranks works; slots beyond E + R hold extra replicas."""

    ep_size: int
    ep_rank: int
    slots_per_rank: int

    @staticmethod
    def for_ranks(num_experts: int, num_redundant: int, ep_size: int, ep_rank: int) -> ExpertLayout:
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank {ep_rank} outside [0, {ep_size})")
        return ExpertLayout(ep_size, ep_rank, -(-(num_experts + num_redundant) // ep_size))

    @property
    def num_physical(self) -> int:
        return self.ep_size * self.slots_per_rank

    @property
    def first_slot(self) -> int:
        return self.ep_rank * self.slots_per_rank


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, ep_size: int = 1, ep_rank: int = 0, num_redundant: int = 0,
                 backend: ExpertBackend = fused_moe, router: TopkRouter | None = None) -> None:
        super().__init__()
        self.num_logical = num_experts
        self.top_k, self.renormalize, self.backend, self.router = top_k, renormalize, backend, router
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.w13 = nn.Parameter(torch.empty(0), requires_grad=False)  # [slots_per_rank, 2I, H] (set_layout)
        self.w2 = nn.Parameter(torch.empty(0), requires_grad=False)  # [slots_per_rank, H, I]
        self.w13.weight_loader = self._load_expert
        self.w2.weight_loader = self._load_expert
        # Set by elastic.distributed.expert_parallel when experts are spread over several ranks.
        self.ep_comm: Callable[[FusedMoE, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.set_layout(ExpertLayout.for_ranks(num_experts, num_redundant, ep_size, ep_rank))

    def set_layout(self, layout: ExpertLayout) -> None:
        """(Re)build this layer for `layout`: slot tensors (allocated, not filled, when slots per rank change),
        placement maps at their fixed shapes, the initial placement (logical e in slot e, extra slots
        replicate round-robin) and the load counter. Captured CUDA graphs must be re-captured after this;
        weights must be loaded or moved in."""
        if layout.num_physical < self.num_logical:
            raise ValueError(f"{layout.ep_size} ranks x {layout.slots_per_rank} slots cannot hold "
                             f"{self.num_logical} experts")
        self.layout = layout
        if self.w13.shape[:1] != (layout.slots_per_rank,):
            i, h = self.intermediate_size, self.hidden_size
            like = dict(dtype=self.w13.dtype, device=self.w13.device)
            self.w13.data = torch.empty(layout.slots_per_rank, 2 * i, h, **like)
            self.w2.data = torch.empty(layout.slots_per_rank, h, i, **like)
        device = self.w13.device
        # Fixed shapes from here on: rebalancing rewrites them in place, so CUDA graphs keep pointing at them.
        # An expert has at most num_physical - E + 1 replicas (every other expert keeps one).
        max_replicas = layout.num_physical - self.num_logical + 1
        self.register_buffer("physical_to_logical", torch.empty(layout.num_physical, dtype=torch.long,
                                                                device=device), persistent=False)
        self.register_buffer("logical_to_physical", torch.empty(self.num_logical, max_replicas, dtype=torch.long,
                                                                device=device), persistent=False)
        self.register_buffer("logical_replica_count", torch.empty(self.num_logical, dtype=torch.long,
                                                                  device=device), persistent=False)
        # Tokens routed to each physical slot, accumulated on device (no host sync) for EPLB; the balancer
        # re-points this at a row of its per-step buffer.
        self.register_buffer("expert_load", torch.zeros(layout.num_physical, dtype=torch.long, device=device),
                             persistent=False)
        self.set_placement(torch.arange(layout.num_physical, device="cpu") % self.num_logical)

    # The layout is the one record of this layer's share of the slots; these read it.
    @property
    def slots_per_rank(self) -> int:
        return self.layout.slots_per_rank

    @property
    def first_slot(self) -> int:
        return self.layout.first_slot

    @property
    def num_physical(self) -> int:
        return self.layout.num_physical

    def set_placement(self, physical_to_logical: torch.Tensor) -> None:
        """Rewrite the maps in place from a slot assignment [num_physical] (the slot weights are the caller's)."""
        p2l, l2p, counts = placement_maps(physical_to_logical, self.num_logical, self.logical_to_physical.shape[1])
        self.physical_to_logical.copy_(p2l)
        self.logical_to_physical.copy_(l2p)
        self.logical_replica_count.copy_(counts)

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
        ctx = get_forward_context()
        load = self.expert_load if ctx.record_expert_load else None
        if self.router is not None:
            topk_weights, ids = self.router(router_logits)
            physical, local = ids_to_slots(ids, self.logical_to_physical, self.logical_replica_count, load,
                                           self.first_slot, self.slots_per_rank, ctx.num_valid_tokens)
        else:
            topk_weights, physical, local = route_to_slots(
                router_logits, self.top_k, self.renormalize, self.logical_to_physical, self.logical_replica_count,
                load, self.first_slot, self.slots_per_rank,
                num_valid=ctx.num_valid_tokens)  # [T, K] f32, [T, K] int64 global, [T, K] int32
        if self.ep_comm is not None:
            return self.ep_comm(self, hidden, topk_weights, physical)
        return self.backend(hidden, self.w13, self.w2, topk_weights, local)

    def compute_local(self, hidden: torch.Tensor, topk_weights: torch.Tensor, physical: torch.Tensor) -> torch.Tensor:
        """Contributions of this rank's slots only. physical [N, K] global slot ids (-1: none)."""
        return self.backend(hidden, self.w13, self.w2, topk_weights,
                            slots_to_local(physical, self.first_slot, self.slots_per_rank))
