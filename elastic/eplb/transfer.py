"""Moving expert weights between ranks.

Every rank computes the same plan from the old and the new slot maps (no message needed to agree on it),
then one all-to-all per MoE layer carries exactly the slots whose expert changes. The same code re-places
experts for EPLB (same layout, new maps) and for elastic scaling (another number of ranks or slots per
rank): ranks keep their numbers across a resize (survivors of a shrink are 0..N'-1; ranks added by a growth
own no old slots, so they only receive; leaving ranks own no new slots, so they only send).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from elastic.distributed.group import StatelessGroup


@dataclass(frozen=True)
class SlotMove:
    """Expert `expert` is copied from the source rank's old local slot to the destination's new local slot."""

    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


def plan_moves(old_p2l: Sequence[int], old_slots_per_rank: int, new_p2l: Sequence[int],
               new_slots_per_rank: int) -> list[SlotMove]:
    """Where each new slot's weights come from. With an unchanged slots-per-rank the slot tensors are reused,
    so a slot that keeps its expert needs no copy; otherwise every slot is filled anew (locally if its rank
    already holds the expert). Copies prefer a replica on the destination rank, then spread over holders."""
    holders: dict[int, list[int]] = defaultdict(list)  # expert -> old global slots holding it
    for slot, expert in enumerate(old_p2l):
        holders[expert].append(slot)
    reused = old_slots_per_rank == new_slots_per_rank
    moves, turns = [], defaultdict(int)
    for slot, expert in enumerate(new_p2l):
        if reused and slot < len(old_p2l) and old_p2l[slot] == expert:
            continue
        if not holders[expert]:
            raise ValueError(f"expert {expert} has no replica in the old placement to copy from")
        dst_rank, dst_slot = divmod(slot, new_slots_per_rank)
        on_rank = [s for s in holders[expert] if s // old_slots_per_rank == dst_rank]
        if on_rank:
            src = on_rank[0]
        else:
            src = holders[expert][turns[expert] % len(holders[expert])]
            turns[expert] += 1
        moves.append(SlotMove(expert, *divmod(src, old_slots_per_rank), dst_rank, dst_slot))
    return moves


def _rows(w13: torch.Tensor, w2: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """Slots' weights as rows [n, 2I*H + H*I]: one row per expert, so one collective moves them all."""
    index = torch.tensor(slots, dtype=torch.long, device=w13.device)
    return torch.cat([w13.index_select(0, index).flatten(1), w2.index_select(0, index).flatten(1)], dim=1)


def _write(w13: torch.Tensor, w2: torch.Tensor, slots: list[int], rows: torch.Tensor) -> None:
    index = torch.tensor(slots, dtype=torch.long, device=w13.device)
    split = math.prod(w13.shape[1:])
    w13.index_copy_(0, index, rows[:, :split].reshape(len(slots), *w13.shape[1:]))
    w2.index_copy_(0, index, rows[:, split:].reshape(len(slots), *w2.shape[1:]))


def execute_moves(moves: list[SlotMove], rank: int, src: tuple[torch.Tensor, torch.Tensor],
                  dst: tuple[torch.Tensor, torch.Tensor], group: StatelessGroup | None) -> int:
    """Carry out this rank's part of a plan; returns the bytes this rank received from others.

    src: (w13, w2) slot tensors of the old layout, dst: of the new one (the same tensors when reused). Every
    outgoing and local row is gathered before anything is written, so src and dst may alias. Every rank of
    `group` must call this with the same plan (it joins the all-to-all only when some move crosses ranks)."""
    local = [m for m in moves if m.src_rank == rank == m.dst_rank]
    local_rows = _rows(*src, [m.src_slot for m in local]) if local else None
    received, recvs = None, []
    if group is not None and any(m.src_rank != m.dst_rank for m in moves):
        sends = sorted((m for m in moves if m.src_rank == rank != m.dst_rank), key=lambda m: (m.dst_rank, m.dst_slot))
        recvs = sorted((m for m in moves if m.dst_rank == rank != m.src_rank), key=lambda m: (m.src_rank, m.dst_slot))
        width = math.prod(src[0].shape[1:]) + math.prod(src[1].shape[1:])
        send_rows = (_rows(*src, [m.src_slot for m in sends]) if sends
                     else src[0].new_empty((0, width)))
        send_splits = [sum(m.dst_rank == r for m in sends) for r in range(group.world_size)]
        recv_splits = [sum(m.src_rank == r for m in recvs) for r in range(group.world_size)]
        received = group.all_to_all(send_rows, send_splits, recv_splits)  # [len(recvs), width]
    if local_rows is not None:
        _write(*dst, [m.dst_slot for m in local], local_rows)
    if received is not None and recvs:
        _write(*dst, [m.dst_slot for m in recvs], received)
    return 0 if received is None else received.numel() * received.element_size()
