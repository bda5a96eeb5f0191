"""The peer-to-peer expert-parallel exchange (elastic/distributed/peer_exchange.py, kernels/ep_p2p*.py), run by
Triton's interpreter on the CPU: ranks are processes forked from the test, and "peer memory" is shared
memory the parent mapped before the fork (so at the same address in every rank), addressed by raw pointer as
the GPU kernels address NVLink-mapped memory. The result must equal the single-rank MoE over all experts."""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import time

import pytest
import torch
from kernel_testing import needs_triton

from elastic.distributed.peer_exchange import ExchangeShape, PeerExchange
from elastic.kernels import fused_moe_reference

pytestmark = needs_triton

H, INTER, EXPERTS, TOP_K = 32, 16, 8, 2


def _ranks(world: int, capacity: int, dtype: torch.dtype = torch.float32) -> list[PeerExchange]:
    shape = ExchangeShape(world, capacity, H, TOP_K, dtype)
    buffers = [torch.zeros(shape.nbytes, dtype=torch.uint8).share_memory_() for _ in range(world)]
    addresses = [b.data_ptr() for b in buffers]
    ranks = [PeerExchange(shape, r, buffers[r], addresses) for r in range(world)]
    for ex in ranks:  # the device counters too, so that the test sees them
        ex.sequence.share_memory_()
        ex.abort_flag.share_memory_()
    return ranks


def _serial(fn, *args) -> None:
    # The parent's OpenMP pool does not survive a fork: a forked rank runs torch ops on one thread.
    torch.set_num_threads(1)
    fn(*args)


def _start(fn, *args) -> multiprocessing.Process:
    proc = multiprocessing.get_context("fork").Process(target=_serial, args=(fn, *args), daemon=True)
    proc.start()
    return proc


def _run_ranks(world: int, fn, timeout: float = 60) -> None:
    """fn(rank) in one forked process per rank; each writes its results into shared tensors."""
    procs = [_start(fn, r) for r in range(world)]
    try:
        # A rank that fails leaves the others waiting in a barrier: stop at the first failure.
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            multiprocessing.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=1)
            if any(p.exitcode not in (None, 0) for p in procs):
                break
        assert [p.exitcode for p in procs] == [0] * world, "a rank failed or never left a barrier"
    finally:
        for p in procs:
            p.kill()


@pytest.fixture
def triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (set by conftest before triton loads)")
    monkeypatch.setenv("ELASTIC_TRITON_ON_CPU", "1")


@pytest.mark.parametrize("world,tokens", [(2, (3, 5)), (3, (4, 0, 2))])
def test_exchange_equals_single_rank_moe(triton_on_cpu: None, world: int, tokens: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(world)
    w13 = torch.randn(EXPERTS, 2 * INTER, H, generator=g) / 4
    w2 = torch.randn(EXPERTS, H, INTER, generator=g) / 4
    spr = -(-EXPERTS // world)
    hidden = [torch.randn(t, H, generator=g) for t in tokens]
    slots = [torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(t)]) if t else
             torch.empty(0, TOP_K, dtype=torch.long) for t in tokens]
    weights = [torch.rand(t, TOP_K, generator=g) for t in tokens]
    rows = max(tokens)
    ranks = _ranks(world, capacity=8)
    results = [torch.zeros(2, t, H).share_memory_() for t in tokens]

    def layers(rank: int) -> None:
        ex = ranks[rank]
        for layer in range(2):  # two layers back to back: the buffers are reused with two barriers per layer
            all_hidden, all_weights, all_slots = ex.dispatch(hidden[rank], slots[rank], weights[rank], rows)
            local = all_slots - rank * spr
            local = torch.where((all_slots >= 0) & (local >= 0) & (local < spr), local, -1).to(torch.int32)
            mine = slice(rank * spr, (rank + 1) * spr)
            partial = fused_moe_reference(all_hidden, w13[mine], w2[mine], all_weights, local)
            results[rank][layer] = ex.combine_into(partial, tokens[rank], rows)

    _run_ranks(world, layers)
    for rank in range(world):
        expected = fused_moe_reference(hidden[rank], w13, w2, weights[rank], slots[rank].to(torch.int32))
        for out in results[rank]:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert int(ranks[rank].sequence) == 4  # two barriers per layer, counted on the device


def test_padding_rows_reach_no_expert(triton_on_cpu: None) -> None:
    ranks = _ranks(2, capacity=4)
    hidden = torch.ones(1, H)
    slots, weights = torch.tensor([[0, 5]]), torch.tensor([[0.5, 0.5]])
    received = [torch.zeros(6, TOP_K, dtype=torch.long).share_memory_() for _ in range(2)]

    def dispatch(rank: int) -> None:
        received[rank].copy_(ranks[rank].dispatch(hidden, slots, weights, rows=3)[2])

    _run_ranks(2, dispatch)
    for all_slots in received:
        assert all_slots.shape == (6, TOP_K)
        for block in (0, 1):  # each rank's block: its one real row, then two padding rows
            assert all_slots[3 * block].tolist() == [0, 5]
            assert (all_slots[3 * block + 1:3 * block + 3] == -1).all()


def test_abort_releases_a_barrier_no_peer_reaches(triton_on_cpu: None) -> None:
    """Rank 1 never arrives (dead): rank 0 waits on the device until abort() is called (by fault recovery,
    from another thread; here from the test), then returns; a later barrier returns at once."""
    ranks = _ranks(2, capacity=2)

    def wait_alone() -> None:
        ranks[0].barrier()
        ranks[0].barrier()

    waiter = _start(wait_alone)
    try:
        waiter.join(timeout=1.0)
        assert waiter.is_alive(), "the barrier returned without its peer"
        ranks[0].abort()
        waiter.join(timeout=60)
        assert waiter.exitcode == 0
        assert int(ranks[0].sequence) == 2
    finally:
        waiter.kill()
