"""The peer-to-peer expert-parallel exchange (elastic/distributed/peer_exchange.py, kernels/ep_p2p*.py), run by
Triton's interpreter on the CPU: ranks are processes forked from the test, and "peer memory" is shared
memory the parent mapped before the fork (so at the same address in every rank), addressed by raw pointer as
the GPU kernels address NVLink-mapped memory. The result must equal, bit for bit, the all-gather path's
partial results summed in rank order, and the single-rank MoE over all experts (to rounding).

The interpreter runs a grid's programs one after another, so "the last CTA runs the barrier" is always the
grid's last program here; what it checks is the protocol (counts, signals, reset, abort), not the GPU's
memory ordering (kernels/ep_p2p.py argues that)."""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import time

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import needs_triton, poisoned

from elastic.distributed.expert_parallel import ExpertParallelComm
from elastic.distributed.peer_exchange import ExchangeShape, PeerExchange
from elastic.kernels import ep_p2p, fused_moe_reference
from elastic.kernels.routing import slots_to_local
from elastic.layers.moe import FusedMoE, Routing

pytestmark = needs_triton

H, INTER, EXPERTS, TOP_K = 32, 16, 8, 2


def _ranks(world: int, capacity: int, dtype: torch.dtype = torch.float32) -> list[PeerExchange]:
    shape = ExchangeShape(world, capacity, H, TOP_K, dtype)
    buffers = [torch.zeros(shape.nbytes, dtype=torch.uint8).share_memory_() for _ in range(world)]
    addresses = [b.data_ptr() for b in buffers]
    ranks = [PeerExchange(shape, r, buffers[r], addresses) for r in range(world)]
    for ex in ranks:  # the device counters too, so that the test sees them
        ex.sequence.share_memory_()
        ex.arrivals.share_memory_()
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
    # conftest sets TRITON_INTERPRET=1 before triton loads; a run that overrides it cannot test these kernels here.
    assert os.environ.get("TRITON_INTERPRET") == "1", "these tests run the kernels in the Triton interpreter"
    monkeypatch.setenv("ELASTIC_TRITON_ON_CPU", "1")


def _moe_layers(world: int, w13: torch.Tensor, w2: torch.Tensor, num_redundant: int = 0) -> list[FusedMoE]:
    """One FusedMoE per rank holding its share of the experts (slot s = expert s % EXPERTS), in w13's dtype."""
    layers = []
    for rank in range(world):
        default = torch.get_default_dtype()
        torch.set_default_dtype(w13.dtype)  # the layer's slots are made in the default dtype
        try:
            moe = FusedMoE(EXPERTS, TOP_K, H, INTER, renormalize=False, ep_size=world, ep_rank=rank,
                           num_redundant=num_redundant)
        finally:
            torch.set_default_dtype(default)
        spr = moe.slots_per_rank
        slots = torch.arange(rank * spr, (rank + 1) * spr) % EXPERTS
        moe.w13.data.copy_(w13[slots])
        moe.w2.data.copy_(w2[slots])
        layers.append(moe)
    return layers


def _step_inputs(g: torch.Generator, tokens: tuple[int, ...], layer: int) -> list[tuple[torch.Tensor, ...]]:
    """Per rank: hidden [t, H], global slot ids [t, K] int64 (distinct per token), weights [t, K] f32."""
    out = []
    for t in tokens:
        slots = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(t)]) if t else \
            torch.empty(0, TOP_K, dtype=torch.long)
        out.append((torch.randn(t, H, generator=g) * (layer + 1), slots, torch.rand(t, TOP_K, generator=g)))
    return out


def _allgather_sums(layers: list[FusedMoE], inputs: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """What the all-gather path computes: every rank's experts over every rank's (padded) rows, the partial
    results summed per token in rank order in fp32."""
    rows = max(h.shape[0] for h, _, _ in inputs)
    pad = [rows - h.shape[0] for h, _, _ in inputs]
    all_hidden = torch.cat([F.pad(h, (0, 0, 0, p)) for (h, _, _), p in zip(inputs, pad)])
    all_slots = torch.cat([F.pad(s, (0, 0, 0, p), value=-1) for (_, s, _), p in zip(inputs, pad)])
    all_weights = torch.cat([F.pad(w, (0, 0, 0, p)) for (_, _, w), p in zip(inputs, pad)])
    partials = [moe.compute_local(moe.live, all_hidden, all_weights, all_slots) for moe in layers]
    sums = []
    for rank, (h, _, _) in enumerate(inputs):
        acc = torch.zeros(h.shape[0], H)
        for partial in partials:
            acc += partial[rank * rows:rank * rows + h.shape[0]]
        sums.append(acc)
    return sums


# Steps of different sizes, two MoE layers each: ranks with no tokens, and a step where no rank has any; with
# max_programs 2, programs that loop over several rows each (what a prefill chunk of thousands of rows gets).
# Steps of one row per rank take the low-latency protocol, the others the barriers, in turn; start_sequence
# 2**32 - 3: the low-latency flags pass the 32-bit wrap (a flag is never 0, what the buffers start with).
@pytest.mark.parametrize("world,steps,max_programs,start_sequence", [
    (2, [(3, 5), (1, 0)], 512, 0), (2, [(3, 5), (1, 0)], 2, 0), (3, [(4, 0, 2), (0, 0, 0), (1, 2, 1), (1, 0, 1)], 512, 0),
    (2, [(1, 1), (1, 0), (2, 1), (0, 1)], 512, 2**32 - 3)])
def test_exchange_equals_allgather_path(triton_on_cpu: None, monkeypatch: pytest.MonkeyPatch, world: int,
                                        steps: list[tuple[int, ...]], max_programs: int, start_sequence: int) -> None:
    monkeypatch.setattr(ep_p2p, "_MAX_PROGRAMS", max_programs)
    g = torch.Generator().manual_seed(world)
    w13 = torch.randn(EXPERTS, 2 * INTER, H, generator=g) / 4
    w2 = torch.randn(EXPERTS, H, INTER, generator=g) / 4
    layers = _moe_layers(world, w13, w2)
    inputs = [[_step_inputs(g, tokens, layer) for layer in range(2)] for tokens in steps]
    ranks = _ranks(world, capacity=8)
    for ex in ranks:
        ex.sequence.fill_(start_sequence)
    results = [[[torch.zeros(tokens[r], H).share_memory_() for _ in range(2)] for tokens in steps]
               for r in range(world)]

    def run(rank: int) -> None:
        comm = ExpertParallelComm(None, "p2p", ranks[rank])  # type: ignore[arg-type]  (no group needed here)
        moe = layers[rank]
        for step, tokens in enumerate(steps):
            for layer in range(2):  # back to back: the buffers are reused with two barriers per layer
                hidden, slots, weights = inputs[step][layer][rank]
                out = comm._p2p(moe, moe.live, hidden, Routing(weights, slots), max(tokens), local=False)
                results[rank][step][layer].copy_(out)

    _run_ranks(world, run)
    for step, tokens in enumerate(steps):
        for layer in range(2):
            expected = _allgather_sums(layers, inputs[step][layer])
            for rank in range(world):
                got = results[rank][step][layer]
                assert torch.equal(got, expected[rank]), (step, layer, rank)
                hidden, slots, weights = inputs[step][layer][rank]
                single = fused_moe_reference(hidden, w13, w2, weights, slots.to(torch.int32))
                torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-5)
    for ex in ranks:
        assert int(ex.sequence) == start_sequence + 4 * len(steps)  # two exchanges a layer, counted on the device
        assert int(ex.arrivals) == 0  # reset by each kernel's last CTA


@pytest.mark.parametrize("tokens", [(3, 0), (1, 2), (1, 0)])
def test_pairs_summed_as_sent_equal_the_experts_own_sums(triton_on_cpu: None, monkeypatch: pytest.MonkeyPatch,
                                                         tokens: tuple[int, int]) -> None:
    """fp16 experts run Triton's fused MoE, whose pair outputs the push sums as it sends them (no sum kernel):
    bit for bit what the experts' own sums sent as they are give, with padding rows and a rank without tokens.
    The experts' buffers start as NaN: a pair row never written (a slot on the other rank) is never read."""
    from elastic.kernels import moe_triton

    monkeypatch.setattr(moe_triton, "_alloc", poisoned)
    world = 2
    g = torch.Generator().manual_seed(7)
    w13 = (torch.randn(EXPERTS, 2 * INTER, H, generator=g) / 4).half()
    w2 = (torch.randn(EXPERTS, H, INTER, generator=g) / 4).half()
    layers = _moe_layers(world, w13, w2)
    inputs = [(h.half(), s, w) for h, s, w in _step_inputs(g, tokens, 0)]
    assert layers[0].compute_local_pairs(layers[0].live, inputs[0][0], inputs[0][2], inputs[0][1].int()) is not None
    results = {(r, fused): torch.zeros(tokens[r], H, dtype=torch.float16).share_memory_()
               for r in range(world) for fused in (True, False)}

    shared = _ranks(world, capacity=4, dtype=torch.float16)

    def run_shared(rank: int) -> None:
        moe, (hidden, slots, weights) = layers[rank], inputs[rank]
        comm = ExpertParallelComm(None, "p2p", shared[rank])  # type: ignore[arg-type]
        for fused in (True, False):
            if not fused:
                moe.compute_local_pairs = lambda *args: None
            out = comm._p2p(moe, moe.live, hidden, Routing(weights, slots), max(tokens), local=False)
            results[rank, fused].copy_(out)

    _run_ranks(world, run_shared)
    for rank in range(world):
        assert torch.equal(results[rank, True], results[rank, False]), rank
        assert not results[rank, True].isnan().any()
    for rank in range(world):
        hidden, slots, weights = inputs[rank]
        single = fused_moe_reference(hidden.float(), w13.float(), w2.float(), weights, slots.to(torch.int32))
        torch.testing.assert_close(results[rank, True].float(), single, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tokens", [(3, 1), (1, 1)])
def test_unreduced_output_summed_in_the_next_norm(triton_on_cpu: None, tokens: tuple[int, int]) -> None:
    """A decode layer's output left as the combine buffer's per-rank blocks (UnreducedRows) and summed by the next
    RMSNorm's kernel: bit for bit the exchange's reduce kernel followed by the fused add + norm (fp16), with a
    rank holding fewer rows than the step's largest (its blocks' tail is another rank's padding); (1, 1): the
    low-latency protocol's combine."""
    from elastic.kernels.norm import fused_add_rms_norm
    from elastic.layers.norm import RMSNorm
    from elastic.layers.unreduced import UnreducedRows

    world = 2
    g = torch.Generator().manual_seed(11)
    w13 = (torch.randn(EXPERTS, 2 * INTER, H, generator=g) / 4).half()
    w2 = (torch.randn(EXPERTS, H, INTER, generator=g) / 4).half()
    layers = _moe_layers(world, w13, w2)
    inputs = [(h.half(), s, w) for h, s, w in _step_inputs(g, tokens, 0)]
    residuals = [torch.randn(t, H, generator=g).half() for t in tokens]
    norm = RMSNorm(H).half()
    norm.weight.data.uniform_(0.5, 1.5, generator=g)
    results = {(r, what): torch.zeros(tokens[r], H, dtype=torch.float16).share_memory_()
               for r in range(world) for what in ("normed", "residual", "normed_ref", "residual_ref")}
    exchanges = _ranks(world, capacity=4, dtype=torch.float16)

    def run(rank: int) -> None:
        moe, (hidden, slots, weights) = layers[rank], inputs[rank]
        comm = ExpertParallelComm(None, "p2p", exchanges[rank])  # type: ignore[arg-type]
        out = comm._p2p(moe, moe.live, hidden, Routing(weights, slots), max(tokens), local=False, unreduced=True)
        assert isinstance(out, UnreducedRows) and out.num_tokens == tokens[rank]
        normed, residual = norm(out, residuals[rank])
        normed_ref, residual_ref = fused_add_rms_norm(out.reduce(), residuals[rank], norm.weight, norm.eps)
        for name, t in zip(("normed", "residual", "normed_ref", "residual_ref"),
                           (normed, residual, normed_ref, residual_ref)):
            results[rank, name].copy_(t)

    _run_ranks(world, run)
    for rank in range(world):
        assert not results[rank, "normed"].isnan().any()
        assert torch.equal(results[rank, "normed"], results[rank, "normed_ref"]), rank
        assert torch.equal(results[rank, "residual"], results[rank, "residual_ref"]), rank


@pytest.mark.parametrize("tokens,max_programs", [((3, 0), 512), ((1, 0), 512), ((2, 3), 512), ((2, 3), 1)])
def test_dispatch_routes_the_rows_itself(triton_on_cpu: None, monkeypatch: pytest.MonkeyPatch,
                                         tokens: tuple[int, int], max_programs: int) -> None:
    """The router's logits routed inside the dispatch kernel (one launch a layer fewer) give the outputs and the
    expert-load counts of the route kernel followed by the dispatch: with replicas (experts 0 and 1 in two slots,
    tokens taking them in turn), CUDA-graph padding (num_valid: the last row routes nowhere) and a rank without
    tokens. max_programs 1: programs that loop over rows take the route kernel first, as a prefill chunk does."""
    from elastic.kernels.routing import RouterInputs

    monkeypatch.setattr(ep_p2p, "_MAX_PROGRAMS", max_programs)
    world = 2
    g = torch.Generator().manual_seed(5)
    w13 = torch.randn(EXPERTS, 2 * INTER, H, generator=g) / 4
    w2 = torch.randn(EXPERTS, H, INTER, generator=g) / 4
    layers = _moe_layers(world, w13, w2, num_redundant=2)
    hidden = [torch.randn(t, H, generator=g) for t in tokens]
    logits = [torch.randn(t, EXPERTS, generator=g) for t in tokens]
    valid = [torch.tensor([t - 1]) if t > 1 else None for t in tokens]
    num_physical = layers[0].num_physical
    results = {(r, fused): torch.zeros(tokens[r], H).share_memory_() for r in range(world) for fused in (True, False)}
    loads = {(r, fused): torch.zeros(num_physical, dtype=torch.long).share_memory_()
             for r in range(world) for fused in (True, False)}
    exchanges = _ranks(world, capacity=4)

    def run(rank: int) -> None:
        moe = layers[rank]
        comm = ExpertParallelComm(None, "p2p", exchanges[rank])  # type: ignore[arg-type]
        for fused in (True, False):
            router = RouterInputs(logits[rank], TOP_K, True, moe.live.logical_to_physical,
                                  moe.live.logical_replica_count, loads[rank, fused], valid[rank])
            routing = Routing(router=router) if fused else Routing(*router.route()[:2])
            results[rank, fused].copy_(comm._p2p(moe, moe.live, hidden[rank], routing, max(tokens), local=False))

    _run_ranks(world, run)
    for rank in range(world):
        assert torch.equal(results[rank, True], results[rank, False]), rank
        assert torch.equal(loads[rank, True], loads[rank, False]), rank
        assert int(loads[rank, True].sum()) == TOP_K * (tokens[rank] - (valid[rank] is not None))
    assert tokens[1] == 0 or bool(results[1, True].abs().sum() > 0)


def test_dispatch_writes_each_rank_its_local_ids(triton_on_cpu: None) -> None:
    """Rank d receives its own slot index (slots_to_local of rank d), -1 ids and zero weights on padding."""
    ranks, spr, rows = _ranks(2, capacity=4), 4, 3
    hidden = torch.ones(1, H)
    slots, weights = torch.tensor([[0, 5]], dtype=torch.int32), torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    received = [(torch.zeros(6, TOP_K, dtype=torch.int32).share_memory_(), torch.ones(6, TOP_K).share_memory_())
                for _ in range(2)]

    def dispatch(rank: int) -> None:
        _, all_weights, all_ids = ranks[rank].dispatch(hidden, Routing(weights, slots), rows, spr)
        assert all_ids.dtype == torch.int32 and all_ids.is_contiguous() and all_weights.is_contiguous()
        received[rank][0].copy_(all_ids)
        received[rank][1].copy_(all_weights)

    _run_ranks(2, dispatch)
    for rank, (ids, got_weights) in enumerate(received):
        expected = slots_to_local(slots, rank * spr, spr)
        for block in (0, 1):  # each rank's block: its one real row, then two padding rows
            assert ids[rows * block].tolist() == expected[0].tolist()
            assert got_weights[rows * block].tolist() == [0.5, 0.25]
            assert (ids[rows * block + 1:rows * (block + 1)] == -1).all()
            assert (got_weights[rows * block + 1:rows * (block + 1)] == 0).all()


def test_dispatch_sends_a_token_only_where_one_of_its_experts_is(triton_on_cpu: None) -> None:
    """A token is copied to a rank only if one of its slots is there: a token whose experts are all on rank 0
    and a CUDA-graph padding row (routed nowhere: slot -1) leave rank 1's buffer as it was; the ids and
    weights, which tell the experts what to skip, go everywhere."""
    ranks, spr, rows = _ranks(2, capacity=4), 4, 3
    hidden = torch.arange(1.0, 4.0).unsqueeze(1).repeat(1, H)  # row r holds r + 1
    slots = torch.tensor([[0, 5], [1, 2], [-1, -1]], dtype=torch.int32)  # both ranks / rank 0 only / padding
    weights = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]])
    for ex in ranks:
        ex.views["tokens"].fill_(-7.0)

    _run_ranks(2, lambda rank: ranks[rank].dispatch(hidden, Routing(weights, slots), rows, spr))
    for rank, copied in ((0, [True, True, False]), (1, [True, False, False])):
        tokens = ranks[rank].views["tokens"]
        for sender in (0, 1):  # rows sender * rows ... of this rank's buffer
            for row, sent in enumerate(copied):
                want = float(row + 1) if sent else -7.0
                assert (tokens[sender * rows + row] == want).all(), (rank, sender, row)
        assert (ranks[rank].views["ids"][:2 * rows] == slots_to_local(slots, rank * spr, spr).repeat(2, 1)).all()


@pytest.mark.parametrize("rows", [3, 1])
def test_warm_up_waits_for_no_one(triton_on_cpu: None, rows: int) -> None:
    """`local` (CUDA-graph warm-up): the same kernels on this rank's buffers, no barrier, nothing counted (rows 1:
    the low-latency protocol, whose flags would no longer match the peers' had the warm-up counted)."""
    ex = _ranks(2, capacity=4)[0]
    moe = _moe_layers(2, torch.randn(EXPERTS, 2 * INTER, H), torch.randn(EXPERTS, H, INTER))[0]
    comm = ExpertParallelComm(None, "p2p", ex)  # type: ignore[arg-type]
    routing = Routing(torch.rand(rows, TOP_K), torch.zeros(rows, TOP_K, dtype=torch.long))
    out = comm._p2p(moe, moe.live, torch.randn(rows, H), routing, rows=rows, local=True)
    assert out.shape == (rows, H)
    assert int(ex.sequence) == 0 and int(ex.arrivals) == 0


@pytest.mark.parametrize("rows", [2, 1])
def test_abort_releases_a_rank_waiting_in_the_fused_barrier(triton_on_cpu: None, rows: int) -> None:
    """Rank 1 never arrives (dead): rank 0's dispatch waits on the device (its last CTA, in the barrier; rows 1:
    its one program, for rank 1's words) until abort() is called (by fault recovery, from another thread; here
    from the test), then returns; the combine's wait then returns at once."""
    ranks = _ranks(2, capacity=2)

    def layer_alone() -> None:
        ex = ranks[0]
        routing = Routing(torch.ones(rows, TOP_K), torch.zeros(rows, TOP_K, dtype=torch.long))
        ex.dispatch(torch.ones(rows, H), routing, rows, 4)
        ex.combine_into(torch.ones(2 * rows, H), rows, rows)

    waiter = _start(layer_alone)
    try:
        waiter.join(timeout=1.0)
        assert waiter.is_alive(), "the barrier returned without its peer"
        ranks[0].abort()
        waiter.join(timeout=60)
        assert waiter.exitcode == 0
        assert int(ranks[0].sequence) == 2 and int(ranks[0].arrivals) == 0
    finally:
        waiter.kill()


def test_exchange_holds_prefill_steps_within_its_budget() -> None:
    """A step of up to max_num_batched_tokens per rank takes the exchange (prefill included) while the
    buffer stays within its budget; past it the capacity shrinks (larger steps take NCCL), never below what
    every decode graph needs."""
    from types import SimpleNamespace

    def moe(hidden: int, top_k: int) -> FusedMoE:
        return SimpleNamespace(hidden_size=hidden, top_k=top_k, w13=torch.empty(0, dtype=torch.bfloat16))  # type: ignore[return-value]

    qwen3 = ExchangeShape.of(moe(2048, 8), world=2, capacity=8192)
    assert qwen3.capacity == 8192 and qwen3.nbytes < 512 * 2**20
    v3 = ExchangeShape.of(moe(7168, 8), world=8, capacity=8192)
    assert 512 <= v3.capacity < 8192 and v3.nbytes <= 512 * 2**20 + 2**20
    assert ExchangeShape.of(moe(7168, 8), world=256, capacity=8192).capacity == 512
    assert ExchangeShape.of(moe(2048, 8), world=2, capacity=256).capacity == 256
