"""Expert weight moves between ranks (gloo groups in threads): every slot ends up holding its new expert's
weights, for a rebalance (same layout) and for resizes (fewer or more ranks, other slots per rank)."""
from __future__ import annotations

import multiprocessing as mp
import traceback

import pytest
import torch

from elastic.distributed.group import StatelessGroup, create_store
from elastic.eplb.transfer import execute_moves, plan_moves

E, I, H = 6, 3, 4  # experts, intermediate, hidden


def _expert_weights(e: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((2 * I, H), float(e)), torch.full((H, I), 100.0 + e)  # w13, w2: the expert id, readable


def _slots(p2l: list[int], spr: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    experts = p2l[rank * spr:(rank + 1) * spr]
    w13 = torch.stack([_expert_weights(e)[0] for e in experts]) if experts else torch.empty(0, 2 * I, H)
    w2 = torch.stack([_expert_weights(e)[1] for e in experts]) if experts else torch.empty(0, H, I)
    return w13, w2


def _rank_main(rank: int, world: int, port: int, scenarios: list, results: "mp.Queue") -> None:
    """One rank: every scenario in turn, each over a fresh group (processes: gloo set-up in threads can hang)."""
    try:
        store = create_store("127.0.0.1", port, is_master=False)
        out = []
        for n, (old_p2l, old_spr, new_p2l, new_spr) in enumerate(scenarios):
            group = StatelessGroup(store, f"moves/{n}", rank, world, "gloo")
            old = _slots(old_p2l, old_spr, rank)
            garbage = (torch.full((new_spr, 2 * I, H), -1.0), torch.full((new_spr, H, I), -1.0))
            # Unchanged slots per rank: the slot tensors are reused (a rank that had none gets new ones).
            new = old if old_spr == new_spr and old[0].shape[0] == new_spr else garbage
            execute_moves(plan_moves(old_p2l, old_spr, new_p2l, new_spr), rank, old, new, group)
            group.destroy()
            out.append(tuple(w.numpy() for w in new))  # by value: tensors would travel as shared fds
        results.put((rank, out))
    except BaseException:
        results.put((rank, traceback.format_exc()))


def _run_all(world: int, scenarios: list) -> list[list]:
    """-> per scenario, per rank: its new (w13, w2)."""
    store = create_store("127.0.0.1", 0, is_master=True)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, store.port, scenarios, results), daemon=True)
             for r in range(world)]
    try:
        for proc in procs:
            proc.start()
        by_rank = dict(results.get(timeout=120) for _ in range(world))
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    for rank, out in by_rank.items():
        assert not isinstance(out, str), f"rank {rank} failed:\n{out}"
    return [[by_rank[r][n] for r in range(world)] for n in range(len(scenarios))]


def _check(results: list, new_p2l: list[int], new_spr: int) -> None:
    for slot, expert in enumerate(new_p2l):
        rank, local = divmod(slot, new_spr)
        w13, w2 = (torch.from_numpy(w) for w in results[rank])
        assert torch.equal(w13[local], _expert_weights(expert)[0]), (slot, expert)
        assert torch.equal(w2[local], _expert_weights(expert)[1]), (slot, expert)


REBALANCE = ([0, 1, 2, 3, 4, 5, 0, 1], 4, [0, 3, 2, 1, 4, 5, 3, 0], 4)  # 2 ranks x 4 slots, new maps
SCENARIOS = [
    REBALANCE + (),
    ([0, 1, 2, 3, 4, 5], 2, [0, 1, 2, 3, 4, 5, 0, 1], 4),  # shrink 3 -> 2 ranks over the old group
    ([0, 1, 2, 3, 4, 5, 5, 0], 4, [5, 4, 3, 2, 1, 0, 2, 3, 0], 3),  # grow 2 -> 3 ranks over the new group
    ([0, 1, 2, 3, 4, 5, 0, 1], 4, [0, 1, 2, 3, 4, 5, 3, 2, 1, 0, 5, 4], 4),  # grow, same slots per rank
]


def test_rebalance_moves_only_changed_slots() -> None:
    old, spr, new, _ = REBALANCE
    moves = plan_moves(old, spr, new, spr)
    assert {(m.dst_rank, m.dst_slot) for m in moves} == {(0, 1), (0, 3), (1, 2), (1, 3)}
    local = [m for m in moves if m.src_rank == m.dst_rank]
    assert all(m.expert in old[m.dst_rank * spr:(m.dst_rank + 1) * spr] for m in local)  # local replica first


def test_every_new_slot_holds_its_expert_after_the_moves() -> None:
    """A rebalance, a shrink and two growths, over real gloo groups of 3 processes."""
    for (_, _, new, new_spr), results in zip(SCENARIOS, _run_all(3, SCENARIOS)):
        _check(results, new, new_spr)


def test_an_expert_without_a_replica_cannot_be_placed() -> None:
    with pytest.raises(ValueError, match="expert 6"):
        plan_moves([0, 1, 2, 3], 2, [6, 1, 2, 3], 2)
