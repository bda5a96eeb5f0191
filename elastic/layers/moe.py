"""Mixture-of-experts layer whose experts live in stacked *physical slots*.

A rank stores `slots_per_rank` slots; `physical_to_logical[slot]` says which checkpoint (logical) expert a
slot holds. Placement, replication and moves (EPLB, elastic scaling) only rewrite these maps and the
slot tensors; model code never changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from elastic.forward_context import get_forward_context
from elastic.kernels import fused_moe, fused_moe_pairs
from elastic.kernels.fused_moe import pairs_alignment
from elastic.kernels.routing import RouterInputs, ids_to_slots, slots_to_local
from elastic.layers.unreduced import UnreducedRows

if TYPE_CHECKING:
    from elastic.kernels.moe_triton import Alignment

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


@dataclass(frozen=True)
class Routing:
    """A step's expert choice as an expert-parallel exchange gets it: routed already (weights [T, K] f32,
    physical [T, K] global slot ids), or the built-in router's inputs, which the exchange routes itself (the
    peer-to-peer dispatch kernel does, one launch fewer) or through `resolve`."""

    weights: torch.Tensor | None = None
    physical: torch.Tensor | None = None
    router: RouterInputs | None = None

    def resolve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (weights, physical), routing now if they are not yet."""
        if self.router is not None:
            weights, physical, _ = self.router.route()
            return weights, physical
        assert self.weights is not None and self.physical is not None
        return self.weights, self.physical


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


class ExpertSlots:
    """One layout's share of a MoE layer on this rank: the slot weights, the placement maps at fixed shapes
    (rebalancing rewrites them in place, so CUDA graphs keep pointing at them), the load counter and how
    tokens reach the other ranks. A layer serves from its `live` slots; elastic scaling builds the next
    layout's `staged` slots beside them (filled and captured while the live ones serve) and swaps.

    The weights are views of storage that may hold more slots than the layout uses: a layout with fewer
    slots per rank (a scale-up) keeps the first slots in place, and growing back needs no new memory."""

    def __init__(self, num_logical: int, layout: ExpertLayout, storage: tuple[torch.Tensor, torch.Tensor]) -> None:
        if layout.num_physical < num_logical:
            raise ValueError(f"{layout.ep_size} ranks x {layout.slots_per_rank} slots cannot hold "
                             f"{num_logical} experts")
        self.num_logical, self.layout, self.storage = num_logical, layout, storage
        spr = layout.slots_per_rank
        self.w13: torch.Tensor = storage[0][:spr]  # [slots_per_rank, 2I, H]
        self.w2: torch.Tensor = storage[1][:spr]  # [slots_per_rank, H, I]
        device = storage[0].device
        # An expert has at most num_physical - E + 1 replicas (every other expert keeps one).
        max_replicas = layout.num_physical - num_logical + 1
        self.physical_to_logical = torch.empty(layout.num_physical, dtype=torch.long, device=device)
        self.logical_to_physical = torch.empty(num_logical, max_replicas, dtype=torch.long, device=device)
        self.logical_replica_count = torch.empty(num_logical, dtype=torch.long, device=device)
        # Tokens routed to each physical slot, accumulated on device (no host sync) for EPLB; the balancer
        # re-points this at a row of its per-step buffer.
        self.expert_load = torch.zeros(layout.num_physical, dtype=torch.long, device=device)
        # Set by elastic.distributed.expert_parallel when experts are spread over several ranks
        # (moe, slots, hidden, routing: Routing, unreduced=...) -> output.
        self.ep_comm: Callable[..., torch.Tensor | UnreducedRows] | None = None
        self.set_placement(torch.arange(layout.num_physical, device="cpu") % num_logical)

    @property
    def slots_per_rank(self) -> int:
        return self.layout.slots_per_rank

    @property
    def first_slot(self) -> int:
        return self.layout.first_slot

    @property
    def num_physical(self) -> int:
        return self.layout.num_physical

    @property
    def capacity(self) -> int:
        """Slots the storage holds (at least slots_per_rank)."""
        return self.storage[0].shape[0]

    def set_placement(self, physical_to_logical: torch.Tensor) -> None:
        """Rewrite the maps in place from a slot assignment [num_physical] (the slot weights are the caller's)."""
        p2l, l2p, counts = placement_maps(physical_to_logical, self.num_logical, self.logical_to_physical.shape[1])
        self.physical_to_logical.copy_(p2l)
        self.logical_to_physical.copy_(l2p)
        self.logical_replica_count.copy_(counts)

    def local_experts(self) -> torch.Tensor:
        return self.physical_to_logical[self.first_slot:self.first_slot + self.slots_per_rank]


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, ep_size: int = 1, ep_rank: int = 0, num_redundant: int = 0,
                 backend: ExpertBackend = fused_moe, router: TopkRouter | None = None) -> None:
        super().__init__()
        self.num_logical = num_experts
        self.top_k, self.renormalize, self.backend, self.router = top_k, renormalize, backend, router
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        # The live slots' weights, as parameters (the loader fills them; .data follows the live slots).
        self.w13 = nn.Parameter(torch.empty(0), requires_grad=False)  # [slots_per_rank, 2I, H]
        self.w2 = nn.Parameter(torch.empty(0), requires_grad=False)  # [slots_per_rank, H, I]
        self.w13.weight_loader = self._load_expert
        self.w2.weight_loader = self._load_expert
        self.live: ExpertSlots
        self.staged: ExpertSlots | None = None
        self.set_layout(ExpertLayout.for_ranks(num_experts, num_redundant, ep_size, ep_rank))

    # ---- layouts ----------------------------------------------------------------------------------------
    def new_slots(self, layout: ExpertLayout, zero: bool = False) -> ExpertSlots:
        """Slots for `layout`: on the live storage when it holds enough slots (its first slots keep their
        weights), else on new storage (allocated, not filled; zeroed if `zero`, so that a forward over it
        before it is filled computes finite garbage)."""
        storage = (self.w13.data, self.w2.data) if not hasattr(self, "live") else self.live.storage
        if storage[0].shape[:1] < (layout.slots_per_rank,):
            i, h, spr = self.intermediate_size, self.hidden_size, layout.slots_per_rank
            alloc = torch.zeros if zero else torch.empty
            like = dict(dtype=self.w13.dtype, device=self.w13.device)
            storage = (alloc(spr, 2 * i, h, **like), alloc(spr, h, i, **like))
        return ExpertSlots(self.num_logical, layout, storage)

    def set_layout(self, layout: ExpertLayout) -> None:
        """Serve from new slots for `layout` (initial placement: logical e in slot e, extra slots replicate
        round-robin). Captured CUDA graphs must be re-captured after this; weights loaded or moved in."""
        self.activate(self.new_slots(layout))

    def stage(self, layout: ExpertLayout) -> ExpertSlots:
        """The next layout's slots, built beside the live ones (elastic scaling): a forward run under
        `ForwardContext(use_staged=True)` (a CUDA-graph capture) uses them; `activate` swaps them in."""
        self.staged = self.new_slots(layout, zero=True)
        return self.staged

    def activate(self, slots: ExpertSlots) -> None:
        self.live, self.staged = slots, None
        self.w13.data, self.w2.data = slots.w13, slots.w2

    # The live slots are the one record of this layer's share of the experts; these read them.
    @property
    def layout(self) -> ExpertLayout:
        return self.live.layout

    @property
    def slots_per_rank(self) -> int:
        return self.live.slots_per_rank

    @property
    def first_slot(self) -> int:
        return self.live.first_slot

    @property
    def num_physical(self) -> int:
        return self.live.num_physical

    @property
    def physical_to_logical(self) -> torch.Tensor:
        return self.live.physical_to_logical

    @property
    def logical_to_physical(self) -> torch.Tensor:
        return self.live.logical_to_physical

    @property
    def logical_replica_count(self) -> torch.Tensor:
        return self.live.logical_replica_count

    @property
    def expert_load(self) -> torch.Tensor:
        return self.live.expert_load

    @property
    def ep_comm(self) -> Callable | None:
        return self.live.ep_comm

    @ep_comm.setter
    def ep_comm(self, comm: Callable | None) -> None:
        self.live.ep_comm = comm

    def set_placement(self, physical_to_logical: torch.Tensor) -> None:
        self.live.set_placement(physical_to_logical)

    # ---- loading ------------------------------------------------------------------------------------------
    def _load_expert(self, param: nn.Parameter, loaded: torch.Tensor, expert_id: int, shard_id: int | None) -> None:
        """Copy one checkpoint expert's tensor into every local slot holding that expert.

        shard_id: 0 gate rows / 1 up rows of w13; None for w2 (down) or a whole fused gate_up tensor.
        """
        for slot in torch.nonzero(self.live.local_experts() == expert_id).flatten().tolist():
            target = param.data[slot]
            if shard_id is not None:
                half = target.shape[0] // 2
                target = target[shard_id * half:(shard_id + 1) * half]
            if target.shape != loaded.shape:
                raise ValueError(f"expert {expert_id}: shape {tuple(loaded.shape)} != expected {tuple(target.shape)}")
            target.copy_(loaded)

    def needs_expert(self, expert_id: int) -> bool:
        """Whether this rank stores a replica of `expert_id` (so the loader can skip reading the rest)."""
        return bool((self.live.local_experts() == expert_id).any())

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor,
                unreduced_ok: bool = False) -> torch.Tensor | UnreducedRows:
        # hidden [T, H]; router_logits [T, E] -> [T, H]. `unreduced_ok`: the caller hands the output straight to
        # an RMSNorm, so an expert-parallel exchange may leave its per-rank blocks unsummed (UnreducedRows).
        # One kernel on CUDA routes: softmax/top-k, replica choice (token index % replica count), the
        # logical->physical gather, the expert-load count and the local-slot mask.
        ctx = get_forward_context()
        slots = self.staged if ctx.use_staged and self.staged is not None else self.live
        load = slots.expert_load if ctx.record_expert_load else None
        if self.router is not None:
            topk_weights, ids = self.router(router_logits)
            physical, local = ids_to_slots(ids, slots.logical_to_physical, slots.logical_replica_count, load,
                                           slots.first_slot, slots.slots_per_rank, ctx.num_valid_tokens)
            routing = Routing(topk_weights, physical)
        else:
            routing = Routing(router=RouterInputs(router_logits, self.top_k, self.renormalize,
                                                  slots.logical_to_physical, slots.logical_replica_count, load,
                                                  ctx.num_valid_tokens))
        if slots.ep_comm is not None:
            return slots.ep_comm(self, slots, hidden, routing, unreduced=unreduced_ok)
        if routing.router is not None:  # [T, K] f32, [T, K] int64 global, [T, K] int32
            topk_weights, physical, local = routing.router.route(slots.first_slot, slots.slots_per_rank)
        return self.backend(hidden, slots.w13, slots.w2, topk_weights, local)

    def compute_local(self, slots: ExpertSlots, hidden: torch.Tensor, topk_weights: torch.Tensor,
                      physical: torch.Tensor) -> torch.Tensor:
        """Contributions of this rank's slots only. physical [N, K] global slot ids (-1: none)."""
        return self.backend(hidden, slots.w13, slots.w2, topk_weights,
                            slots_to_local(physical, slots.first_slot, slots.slots_per_rank))

    def warm_up_backend(self, num_tokens: int) -> None:
        """Run the expert backend once over `num_tokens` dummy rows of this rank's slots: its kernels for that
        many rows get compiled now (each token-count bucket has its own launch configuration)."""
        slots, device = self.live, self.live.w13.device
        hidden = torch.zeros(num_tokens, self.hidden_size, dtype=slots.w13.dtype, device=device)
        weights = torch.full((num_tokens, self.top_k), 1.0 / self.top_k, dtype=torch.float32, device=device)
        ids = torch.randint(0, slots.slots_per_rank, (num_tokens, self.top_k), dtype=torch.int32, device=device)
        self.backend(hidden, slots.w13, slots.w2, weights, ids)

    def compute_local_ids(self, slots: ExpertSlots, hidden: torch.Tensor, topk_weights: torch.Tensor,
                          local_ids: torch.Tensor) -> torch.Tensor:
        """compute_local for ids already among this rank's slots: local_ids [N, K] int32 in [0, slots_per_rank),
        -1: none (the peer-to-peer dispatch writes them so; no conversion kernel here)."""
        return self.backend(hidden, slots.w13, slots.w2, topk_weights, local_ids)

    def compute_local_pairs(self, slots: ExpertSlots, hidden: torch.Tensor, topk_weights: torch.Tensor,
                            local_ids: torch.Tensor, aligned: Alignment | None = None) -> torch.Tensor | None:
        """compute_local_ids before its sum over each row's K pairs: [N * K, H], row n*K+k the weighted output
        of slot local_ids[n, k] (unwritten where local_ids < 0), for an exchange that sums as it sends. None
        where the backend has no such form (the torch reference; another backend): use compute_local_ids.
        `aligned`: local_ids aligned already (pairs_alignment's buffers, filled by the exchange)."""
        if self.backend is not fused_moe:
            return None
        return fused_moe_pairs(hidden, slots.w13, slots.w2, topk_weights, local_ids, aligned)

    def pairs_alignment(self, slots: ExpertSlots, num_rows: int) -> Alignment | None:
        """Empty buffers for aligning num_rows rows' slot ids as compute_local_pairs would, for an exchange
        whose dispatch kernel aligns them as it ends; None where it cannot (see kernels.pairs_alignment)."""
        if self.backend is not fused_moe:
            return None
        return pairs_alignment(num_rows, self.top_k, slots.w13, slots.w2, slots.w13.dtype)
