"""The mechanics of changing the number of ranks under a running engine (elastic scaling).

- `resize_placement`: the expert placement at the new size, computed by every rank alike from the
  placement in force (no message needed to agree on it), keeping each expert where it is when it can;
- `send_dense_weights` / `recv_dense_weights`: a new rank gets every non-expert weight from a serving
  rank over the new group (no checkpoint read);
- `share_placement` / `transfer_experts`: the placement in force reaches the new ranks, and the next
  layout's expert slots are filled beside the serving ones (elastic/eplb/transfer.py moves only what is
  not in place yet);
- `commit_barrier`: the first collective of the new group at the switch, with a deadline: until it
  succeeds nothing has changed, so a failure there leaves the old layout serving.

The control protocol around these (prepare beside serving, commit at an agreed step) is scale_agent.py.
"""
from __future__ import annotations

import dataclasses
import datetime
from collections import Counter

import torch
import torch.distributed as dist
from torch import nn

from elastic.config import EngineConfig, ParallelConfig
from elastic.distributed.group import StatelessGroup
from elastic.distributed.parallel_state import ParallelState
from elastic.eplb.balancer import ExpertBalancer
from elastic.eplb.transfer import SlotMove, execute_moves, plan_moves
from elastic.executor.cuda_graphs import StepGraphs
from elastic.layers.moe import ExpertLayout, ExpertSlots, FusedMoE
from elastic.protocol.scaling import ParallelLayout


def slots_per_rank(num_experts: int, num_redundant: int, world_size: int) -> int:
    return ExpertLayout.for_ranks(num_experts, num_redundant, world_size, 0).slots_per_rank


# ---- the next layout -----------------------------------------------------------------------------------
@dataclasses.dataclass
class StagedLayout:
    """The next layout, ready to swap in (EngineCore.activate)."""

    layout: ParallelLayout
    groups: ParallelState | None  # None at size 1
    config: EngineConfig  # with the new parallel layout
    balancer: ExpertBalancer | None
    graphs: StepGraphs | None


def parallel_config_for(parallel: ParallelConfig, layout: ParallelLayout | None) -> ParallelConfig:
    if layout is None:
        return parallel
    return dataclasses.replace(parallel, data_parallel_size=layout.world_size, data_parallel_rank=layout.rank,
                               store_host=layout.store_host, store_port=layout.store_port)


# ---- placement ----------------------------------------------------------------------------------------
def resize_placement(old_p2l: torch.Tensor, old_world: int, new_world: int, num_experts: int,
                     num_redundant: int) -> torch.Tensor:
    """[L, old slots] -> [L, new slots]: each layer's slot -> expert map for `new_world` ranks.

    Ranks keep their numbers (survivors of a shrink are the lowest). Every rank that stays keeps the
    experts of its first min(old, new) slots per rank exactly where they are: those slots serve until the
    switch while the next layout is filled beside them, so nothing may be written there. Experts left
    without a slot (their ranks leave, or slots per rank shrink) go to the ranks with the most free slots;
    the slots still free take a replica of the expert with the fewest."""
    new_spr = slots_per_rank(num_experts, num_redundant, new_world)
    old_spr = old_p2l.shape[1] // old_world
    if old_p2l.shape[0] == 0:  # no MoE layer
        return old_p2l.new_empty(0, new_spr * new_world)
    return torch.stack([torch.tensor(_resize_layer(row.tolist(), old_spr, old_world, new_spr, new_world,
                                                   num_experts), dtype=torch.long) for row in old_p2l])


def _resize_layer(old: list[int], old_spr: int, old_world: int, new_spr: int, new_world: int,
                  num_experts: int) -> list[int]:
    new = [-1] * (new_spr * new_world)
    for rank in range(min(old_world, new_world)):  # 1. the slots that keep serving keep their experts
        for j in range(min(old_spr, new_spr)):
            new[rank * new_spr + j] = old[rank * old_spr + j]
    placed = set(new)
    for expert in (e for e in range(num_experts) if e not in placed):  # 2. experts left without a slot
        free = [sum(new[r * new_spr + j] < 0 for j in range(new_spr)) for r in range(new_world)]
        rank = max(range(new_world), key=lambda r: (free[r], -r))
        j = next(j for j in range(new_spr) if new[rank * new_spr + j] < 0)
        new[rank * new_spr + j] = expert
    replicas = Counter(e for e in new if e >= 0)
    for slot in (s for s in range(len(new)) if new[s] < 0):  # 3. the rest hold replicas
        rank = slot // new_spr
        on_rank = set(new[rank * new_spr:(rank + 1) * new_spr])
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


def share_placement(group: StatelessGroup, maps: torch.Tensor | None, timeout_s: float) -> torch.Tensor:
    """Rank 0's placement [L, S] to every rank of `group` (the new ranks of a scale-up have none); CPU
    tensors on the gloo DP group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    shape = torch.tensor(list(maps.shape) if maps is not None else [0, 0], dtype=torch.long)
    group.pg.broadcast([shape], opts).wait(timeout)
    if group.rank != 0 or maps is None:
        maps = torch.empty(*shape.tolist(), dtype=torch.long)
    if maps.numel():
        group.pg.broadcast([maps], opts).wait(timeout)
    return maps


def transfer_experts(old_p2l: torch.Tensor, new_p2l: torch.Tensor, old_world: int, new_world: int, rank: int,
                     src: list[ExpertSlots] | None, dst: list[ExpertSlots] | None,
                     group: StatelessGroup | None, serving: bool = True) -> int:
    """Every MoE layer's `transfer_layer`; returns the bytes this rank received."""
    return sum(transfer_layer(i, old_p2l, new_p2l, old_world, new_world, rank, src, dst, group, serving)
               for i in range(old_p2l.shape[0]))


def transfer_layer(i: int, old_p2l: torch.Tensor, new_p2l: torch.Tensor, old_world: int, new_world: int,
                   rank: int, src: list[ExpertSlots] | None, dst: list[ExpertSlots] | None,
                   group: StatelessGroup | None, serving: bool = True,
                   moves: list[SlotMove] | None = None) -> int:
    """Fill MoE layer `i`'s next-layout slots `dst[i]` from its slots in force `src[i]`, moving only what is
    not already in place (elastic/eplb/transfer.py), and set their placement; returns the bytes received.
    src: None on a rank the scale-up adds (it owns no old slots); dst: None on a rank that leaves (it only
    sends). Every rank of `group` calls this with the same maps, so all plan the same moves. `serving`: the
    `src` slots serve meanwhile, so a slot that both share (same storage, a first slot that stays) must
    already hold its expert, and is never written (else every row is read before any is written).
    `moves`: the layer's plan when the caller made it already (plan_moves of the same maps)."""
    old_spr, new_spr = old_p2l.shape[1] // old_world, new_p2l.shape[1] // new_world
    old_row, new_row = old_p2l[i].tolist(), new_p2l[i].tolist()
    source = src[i] if src is not None else None
    target = dst[i] if dst is not None else None
    if moves is None:
        moves = plan_moves(old_row, old_spr, new_row, new_spr)
    if serving and source is not None and target is not None and source.storage[0] is target.storage[0]:
        moves = [m for m in moves if not _in_place(m, rank, old_row, old_spr, source.slots_per_rank)]
    either = source or target
    assert either is not None
    received = execute_moves(moves, rank, _tensors(source or either), _tensors(target or either), group)
    if target is not None:
        target.set_placement(torch.tensor(new_row, dtype=torch.long, device="cpu"))
    return received


def _in_place(move: SlotMove, rank: int, old_row: list[int], old_spr: int, live_spr: int) -> bool:
    """Whether `move` lands on a slot of this rank that keeps serving until the switch: it must already
    hold the expert (resize_placement keeps them), so there is nothing to copy."""
    if move.dst_rank != rank or move.dst_slot >= live_spr:
        return False
    if old_row[rank * old_spr + move.dst_slot] != move.expert:
        raise RuntimeError(f"slot {move.dst_slot} serves expert {old_row[rank * old_spr + move.dst_slot]} "
                           f"until the switch; the new placement wants expert {move.expert} there")
    return True


def _tensors(slots: ExpertSlots) -> tuple[torch.Tensor, torch.Tensor]:
    return slots.w13, slots.w2


# ---- the commit's first collective --------------------------------------------------------------------
def commit_barrier(group: StatelessGroup, wave: tuple[int, int], maps: torch.Tensor,
                   timeout_s: float) -> tuple[tuple[int, int], torch.Tensor]:
    """Rank 0 broadcasts its wave state (number, running) and a placement [L, S] (empty when the ranks
    already agree on it; a new rank has neither), then every rank confirms with an all-reduce: any failure
    (a peer that died, the deadline) raises before anything has changed on any rank. CPU tensors, on the
    gloo DP group."""
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
