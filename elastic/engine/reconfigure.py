"""The mechanics of changing the number of ranks under a running engine (elastic scaling).

- `resize_placement`: the expert placement at the new size, computed by every rank alike from the
  placement in force (no message needed to agree on it), keeping each expert where it is when it can;
- `send_dense_weights` / `recv_dense_weights`: a new rank gets every non-expert weight from a serving
  rank over the new group (no checkpoint read);
- `move_experts`: every MoE layer to the new slot layout, moving only what changes (elastic/eplb/transfer.py);
- `commit_barrier`: the first collective of the new group, with a deadline: until it succeeds nothing has
  changed, so a failure there leaves the old layout serving.

The control protocol around these (prepare beside serving, commit at an agreed step) is scale_agent.py.
"""
from __future__ import annotations

import datetime
from collections import Counter

import torch
import torch.distributed as dist
from torch import nn

from elastic.distributed.group import StatelessGroup
from elastic.eplb.transfer import execute_moves, plan_moves
from elastic.layers.moe import ExpertLayout, FusedMoE


def slots_per_rank(num_experts: int, num_redundant: int, world_size: int) -> int:
    return ExpertLayout.for_ranks(num_experts, num_redundant, world_size, 0).slots_per_rank


# ---- placement ----------------------------------------------------------------------------------------
def resize_placement(old_p2l: torch.Tensor, old_world: int, new_world: int, num_experts: int,
                     num_redundant: int) -> torch.Tensor:
    """[L, old slots] -> [L, new slots]: each layer's slot -> expert map for `new_world` ranks.

    Ranks keep their numbers (survivors of a shrink are the lowest), so rank r < min(old, new) keeps the
    experts of its first slots in place; experts that lose their last replica (their ranks leave, or slots
    per rank shrink) go to the ranks with the most free slots; slots still free keep the expert they held
    (no move) or take a replica of the expert with the fewest."""
    new_spr = slots_per_rank(num_experts, num_redundant, new_world)
    old_spr = old_p2l.shape[1] // old_world
    if old_p2l.shape[0] == 0:  # no MoE layer
        return old_p2l.new_empty(0, new_spr * new_world)
    return torch.stack([torch.tensor(_resize_layer(row.tolist(), old_spr, old_world, new_spr, new_world,
                                                   num_experts), dtype=torch.long) for row in old_p2l])


def _resize_layer(old: list[int], old_spr: int, old_world: int, new_spr: int, new_world: int,
                  num_experts: int) -> list[int]:
    new = [-1] * (new_spr * new_world)
    kept = min(old_spr, new_spr)
    for rank in range(min(old_world, new_world)):  # 1. unique experts stay in their slots
        for j in range(kept):
            expert = old[rank * old_spr + j]
            if expert not in new:
                new[rank * new_spr + j] = expert
    placed = set(new)
    for expert in (e for e in range(num_experts) if e not in placed):  # 2. experts left without a slot
        free = [sum(new[r * new_spr + j] < 0 for j in range(new_spr)) for r in range(new_world)]
        rank = max(range(new_world), key=lambda r: (free[r], -r))
        j = next(j for j in range(new_spr) if new[rank * new_spr + j] < 0)
        new[rank * new_spr + j] = expert
    replicas = Counter(e for e in new if e >= 0)
    for slot in range(len(new)):  # 3. the rest hold replicas
        if new[slot] >= 0:
            continue
        rank, j = divmod(slot, new_spr)
        on_rank = set(new[rank * new_spr:(rank + 1) * new_spr])
        if rank < old_world and j < old_spr and old[rank * old_spr + j] not in on_rank:
            expert = old[rank * old_spr + j]  # what this slot held: no copy needed
        else:
            candidates = [e for e in range(num_experts) if e not in on_rank] or list(range(num_experts))
            expert = min(candidates, key=lambda e: (replicas[e], e))
        new[slot] = expert
        replicas[expert] += 1
    return new


# ---- weights ------------------------------------------------------------------------------------------
def dense_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter outside the expert slots, in a fixed order (the same on every rank)."""
    expert = {id(p) for m in model.modules() if isinstance(m, FusedMoE) for p in (m.w13, m.w2)}
    return [p.data for _, p in sorted(model.named_parameters()) if id(p) not in expert]


def send_dense_weights(model: nn.Module, group: StatelessGroup, dst_ranks: list[int]) -> int:
    """Point-to-point, so only the sender and its receivers take part (the other ranks keep serving)."""
    sent = 0
    for dst in dst_ranks:
        for tag, tensor in enumerate(dense_parameters(model)):
            group.send(tensor.contiguous(), dst, tag).wait()
            sent += tensor.numel() * tensor.element_size()
    return sent


def recv_dense_weights(model: nn.Module, group: StatelessGroup, src: int) -> int:
    received = 0
    for tag, tensor in enumerate(dense_parameters(model)):
        buf = tensor if tensor.is_contiguous() else torch.empty_like(tensor)
        group.recv(buf, src, tag).wait()
        if buf is not tensor:
            tensor.copy_(buf)
        received += tensor.numel() * tensor.element_size()
    return received


def placement_of(layers: list[FusedMoE]) -> torch.Tensor:
    """[L, slots]: the placement in force (the same on every rank)."""
    return torch.stack([m.physical_to_logical.cpu() for m in layers]) if layers else torch.empty(0, 0,
                                                                                                  dtype=torch.long)


def move_experts(layers: list[FusedMoE], old_p2l: torch.Tensor, new_p2l: torch.Tensor, old_world: int,
                 new_world: int, rank: int, new_layout: ExpertLayout | None, group: StatelessGroup | None) -> int:
    """Every layer from `old_p2l` over `old_world` ranks to `new_p2l` over `new_world` (this rank at
    `new_layout`; None: it leaves, so it only sends). Every rank of `group` calls this with the same maps,
    so every rank plans the same moves; returns the bytes this rank received."""
    received = 0
    old_spr = old_p2l.shape[1] // old_world if old_p2l.numel() else 0
    for moe, old_row, new_row in zip(layers, old_p2l, new_p2l):
        src = (moe.w13.data, moe.w2.data)
        if new_layout is not None:
            moe.set_layout(new_layout)  # new slot tensors when slots per rank change; src keeps the old ones
        dst = (moe.w13.data, moe.w2.data)
        new_spr = new_row.numel() // new_world
        moves = plan_moves(old_row.tolist(), old_spr, new_row.tolist(), new_spr)
        received += execute_moves(moves, rank, src, dst, group)
        if new_layout is not None:
            moe.set_placement(new_row)
    return received


# ---- the commit's first collective --------------------------------------------------------------------
def commit_barrier(group: StatelessGroup, wave: tuple[int, int], maps: torch.Tensor,
                   timeout_s: float) -> tuple[tuple[int, int], torch.Tensor]:
    """Rank 0 broadcasts its wave state (number, running) and the placement in force [L, S] (a new rank has
    neither), then every rank confirms with an all-reduce: any failure (a peer that died, the deadline)
    raises before anything has changed on any rank. CPU tensors, on the gloo DP group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    header = torch.tensor([wave[0], wave[1], *maps.shape], dtype=torch.long)  # [4]
    group.pg.broadcast([header], opts).wait(timeout)
    num_layers, num_slots = header[2:].tolist()
    if group.rank != 0:
        maps = torch.empty(num_layers, num_slots, dtype=torch.long)
    if maps.numel():
        group.pg.broadcast([maps], opts).wait(timeout)
    ok = torch.ones(1)
    reduce_opts = dist.AllreduceOptions()
    reduce_opts.reduceOp = dist.ReduceOp.MIN
    group.pg.allreduce([ok], reduce_opts).wait(timeout)
    return (int(header[0]), int(header[1])), maps
