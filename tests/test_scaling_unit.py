"""Elastic scaling, the parts that need no process: expert placement across sizes, the operation state
machine (idempotency, conflicts, never stuck), the size checks, the messages, the coordinator's resize."""
from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
import torch

from elastic.cluster.coordinator import Coordinator
from elastic.cluster.devices import pick_device
from elastic.config import create_engine_config
from elastic.elastic_ep.capacity import check_target, expert_bytes
from elastic.elastic_ep.operation import IDLE, PREPARING, ROLLED_BACK, SUCCEEDED, ScaleError, ScaleTracker
from elastic.engine.reconfigure import resize_placement, slots_per_rank, transfer_layer
from elastic.engine.staging import LayoutStaging, PlacementPlan, _nothing
from elastic.layers.moe import ExpertLayout, FusedMoE
from elastic.eplb.transfer import plan_moves
from elastic.protocol import from_engine, scaling, to_engine
from elastic.protocol.to_coordinator import EngineLoad, ScaleElasticEP
from elastic.sampling_params import SamplingParams


# ---- expert placement -------------------------------------------------------------------------------------
def _initial(num_experts: int, redundant: int, world: int, layers: int = 3) -> torch.Tensor:
    spr = slots_per_rank(num_experts, redundant, world)
    row = torch.arange(spr * world) % num_experts
    return torch.stack([row.roll(i) for i in range(layers)])  # layers differ, as after EPLB


@pytest.mark.parametrize("experts, redundant, sizes", [
    (8, 0, (2, 3, 1, 2)), (8, 1, (1, 2, 3, 2, 1)), (128, 0, (2, 8, 3, 16, 1)), (6, 0, (4, 5, 4)), (4, 0, (1, 6, 2)),
])
def test_resize_placement_covers_every_expert_and_moves_little(experts: int, redundant: int, sizes) -> None:
    maps, world = _initial(experts, redundant, sizes[0]), sizes[0]
    for new_world in sizes[1:]:
        new = resize_placement(maps, world, new_world, experts, redundant)
        spr_old, spr_new = maps.shape[1] // world, slots_per_rank(experts, redundant, new_world)
        assert new.shape == (maps.shape[0], spr_new * new_world)
        for layer in range(maps.shape[0]):
            assert set(new[layer].tolist()) == set(range(experts)), "an expert lost its last replica"
            kept_slots = min(spr_old, spr_new)
            for rank in range(new_world):  # no rank holds the same expert twice when it need not
                held = new[layer, rank * spr_new:(rank + 1) * spr_new].tolist()
                # ... except twice-held experts in slots that keep serving until the switch (never written)
                inherited = (kept_slots - len(set(held[:kept_slots]))) if rank < min(world, new_world) else 0
                assert len(set(held)) == min(spr_new - inherited, experts)
                if rank < min(world, new_world):
                    assert held[:kept_slots] == maps[layer, rank * spr_old:rank * spr_old + kept_slots].tolist()
            moves = plan_moves(maps[layer].tolist(), spr_old, new[layer].tolist(), spr_new)
            kept = min(world, new_world) * min(spr_old, spr_new)
            crossing = [m for m in moves if m.src_rank != m.dst_rank]
            # Only slots whose expert must come from elsewhere cross ranks: at most the slots not kept.
            assert len(crossing) <= new.shape[1] - min(kept, experts) + max(0, spr_new - spr_old) * new_world
        assert torch.equal(new, resize_placement(maps, world, new_world, experts, redundant))  # deterministic
        maps, world = new, new_world


def test_resize_keeps_survivors_slots_in_place() -> None:
    maps = _initial(8, 0, 2)  # 4 slots per rank
    grown = resize_placement(maps, 2, 4, 8, 0)  # 2 slots per rank: each old rank keeps its first two experts
    for layer in range(maps.shape[0]):
        assert grown[layer, :2].tolist() == maps[layer, :2].tolist()
        assert grown[layer, 2:4].tolist() == maps[layer, 4:6].tolist()
    shrunk = resize_placement(grown, 4, 2, 8, 0)
    for layer in range(maps.shape[0]):
        assert shrunk[layer, :2].tolist() == grown[layer, :2].tolist()


def _layer_with_experts(num_experts: int, redundant: int, world: int) -> FusedMoE:
    """Rank 0's FusedMoE at `world` ranks, each slot's weights filled with its expert's id."""
    moe = FusedMoE(num_experts, 2, hidden_size=4, intermediate_size=3, renormalize=True, ep_size=world, ep_rank=0,
                   num_redundant=redundant)
    for slot, expert in enumerate(moe.live.local_experts().tolist()):
        moe.w13.data[slot].fill_(expert)
        moe.w2.data[slot].fill_(expert)
    return moe


def test_staging_beside_serving_never_writes_a_serving_slot() -> None:
    """A scale-up stages rank 0's next slots on its live storage (fewer slots per rank): the slots that keep
    serving until the switch keep their weights untouched, and the staged placement matches the weights."""
    moe = _layer_with_experts(8, 0, 1)  # 8 slots on one rank
    serving = moe.w13.data.clone()
    old = moe.live.physical_to_logical.cpu()[None]  # [1 layer, 8 slots]
    new = resize_placement(old, 1, 2, 8, 0)  # 4 slots per rank
    staged = moe.stage(ExpertLayout.for_ranks(8, 0, 2, 0))
    assert staged.storage[0] is moe.live.storage[0]  # no new memory: a view of the live storage
    transfer_layer(0, old, new, 1, 2, 0, [moe.live], [staged], group=None)  # rank 1's moves need a group
    assert torch.equal(moe.w13.data, serving)  # nothing written where the live layout reads
    for slot, expert in enumerate(staged.local_experts().tolist()):
        assert bool((staged.w13[slot] == expert).all())
    # A placement that would rewrite a serving slot is refused rather than corrupting live weights.
    bad = new.clone()
    bad[0, [0, 1]] = bad[0, [1, 0]]
    with pytest.raises(RuntimeError, match="serves expert"):
        transfer_layer(0, old, bad, 1, 2, 0, [moe.live], [moe.stage(ExpertLayout.for_ranks(8, 0, 2, 0))], None)


def test_shrink_stages_new_storage_when_the_old_is_too_small() -> None:
    moe = _layer_with_experts(8, 0, 2)  # rank 0 of 2: 4 slots
    staged = moe.stage(ExpertLayout.for_ranks(8, 0, 1, 0))  # back to one rank: 8 slots
    assert staged.storage[0] is not moe.live.storage[0] and staged.capacity == 8
    assert bool((staged.w13 == 0).all())  # zeroed until filled: a warm-up over it computes finite garbage


def test_a_replacement_rank_never_lands_on_a_survivors_gpu() -> None:
    assert pick_device("cuda", 2, 3, {"cuda:0", "cuda:1"}) == "cuda:2"  # the usual: rank i on cuda:i
    # 3 ranks, rank 1 (cuda:1) died: the survivor on cuda:2 is rank 1 now; the replacement, rank 2, takes cuda:1.
    assert pick_device("cuda", 2, 3, {"cuda:0", "cuda:2"}) == "cuda:1"
    assert pick_device("cuda:2", 1, 2, {"cuda:3"}) == "cuda:2"  # counted from the first device
    assert pick_device("cuda:2", 0, 2, {"cuda:2"}) == "cuda:3"
    assert pick_device("cpu", 1, 2, {"cpu"}) == "cpu"


# ---- the state machine ------------------------------------------------------------------------------------
def test_tracker_idempotency_conflicts_and_history() -> None:
    async def main() -> None:
        t = ScaleTracker(2)
        assert t.status()["state"] == IDLE and t.status()["last"] is None
        op, new = t.begin(3, 0.0, "a")
        assert new and t.state == PREPARING and t.status()["target"] == 3
        assert t.begin(3, 0.0, "a") == (op, False)  # the same id joins the running operation
        with pytest.raises(ScaleError) as e:
            t.begin(1, 0.0, "b")
        assert e.value.status == 409
        with pytest.raises(ScaleError) as e:
            t.begin(1, 0.0, None)
        assert e.value.status == 409
        with pytest.raises(ScaleError) as e:
            t.begin(4, 0.0, "a")  # an id names one operation
        assert e.value.status == 409
        t.finish(op, SUCCEEDED, 3)
        assert op.done.is_set() and t.state == IDLE and t.size == 3
        assert t.begin(3, 0.0, "a") == (op, False)  # done: the recorded outcome
        op2, new = t.begin(1, 0.0, None)
        assert new and op2.operation_id != "a" and op2.direction == "down"
        t.finish(op2, ROLLED_BACK, 3, "boom")
        status = t.status()
        assert status["state"] == IDLE and status["data_parallel_size"] == 3
        assert status["last"]["result"] == ROLLED_BACK and status["last"]["error"] == "boom"

    asyncio.run(main())


# ---- sizes ------------------------------------------------------------------------------------------------
def test_shrink_pieces_pair_up_between_survivors_and_leaving_ranks(checkpoint_dir) -> None:
    """Staging pieces run one per step on every rank and pair up by position: a survivor routes its next slots
    with its first piece (at size 1, or over a p2p exchange, its graphs record no collective: they are
    captured from then on, while the communicator is set up and the experts move), sets its next group's
    communicator up with the second, which a leaving rank steps through doing nothing; both then run the
    same layer pieces."""
    config = create_engine_config(str(checkpoint_dir("qwen3_moe")), device="cpu", dtype="float32",
                                  data_parallel_size=2)

    def staging(rank: int, layout: scaling.ParallelLayout | None) -> LayoutStaging:
        layers = [_layer_with_experts(8, 0, 2) for _ in range(3)]
        model = SimpleNamespace(moe_layers=lambda: layers, modules=lambda: layers)
        core = SimpleNamespace(config=config, layout=SimpleNamespace(rank=rank),
                               runner=SimpleNamespace(model=model))
        plan = PlacementPlan.compute(_initial(8, 0, 2), 2, 1, 8, 0)
        return LayoutStaging(core, layout, None, 2, 1, plan, [], timeout_s=5)

    survivor = staging(0, scaling.ParallelLayout(1, 1, 0, "127.0.0.1", 0))
    leaving = staging(1, None)
    mine, theirs = survivor.pieces(), leaving.pieces()
    assert len(mine) == len(theirs) >= 3
    assert mine[1] == survivor._connect and theirs[1] is _nothing
    assert not survivor.connected
    mine[0]()  # the next slots, routed
    assert survivor.connected and survivor.slots is not None
    assert all(m.staged is s and s.ep_comm is None for m, s in zip(survivor.moe, survivor.slots))
    mine[1]()  # the communicator (none at size 1)
    assert survivor.connected


def test_check_target(tmp_path: Path, checkpoint_dir) -> None:
    config = create_engine_config(str(checkpoint_dir("qwen3_moe")), device="cpu", dtype="float32",
                                  data_parallel_size=2, max_data_parallel_size=4)
    assert check_target(config, 2, 4) == 4
    for bad in (0, -1, 5, "2", 2.0, True, None):
        with pytest.raises(ScaleError) as e:
            check_target(config, 2, bad)
        assert e.value.status == 400
    # Shrinking gives each survivor more expert slots, staged beside the live ones: refused when they
    # would not fit, unless the survivor's storage already holds them (it served at that size before).
    layers, slot = sum(config.model.arch.sparse_layers), expert_bytes(config)
    need = 8 * layers * slot  # 4 -> 8 slots per rank in every layer, the old 4 kept until the switch
    assert check_target(config, 2, 1, survivors=[(need, 4), (0, 4)]) == 1
    with pytest.raises(ScaleError, match="cannot hold the model"):
        check_target(config, 2, 1, survivors=[(need - 1, 4), (need, 4)])
    assert check_target(config, 2, 1, survivors=[(0, 8), (0, 4)]) == 1  # rank 0 kept 8 slots' storage
    unlimited = create_engine_config(str(checkpoint_dir("qwen3_moe")), device="cpu", dtype="float32")
    assert check_target(unlimited, 1, 64) == 64  # CPU: no device limit unless configured


# ---- messages and the coordinator ---------------------------------------------------------------------------
def test_scaling_messages_round_trip() -> None:
    enc = msgspec.msgpack.Encoder()
    layout = scaling.ParallelLayout(3, 4, 1, "127.0.0.1", 1234)
    control = [scaling.PrepareScale("op", 2, 4, layout, [2, 3], 0.5, scaling.CoordinatorLink("a", "b"), 9.0),
               scaling.PrepareScale("op", 4, 2, None, drain_timeout_s=1.0), scaling.CommitScale("op", 5.0),
               scaling.AbortScale("op"), scaling.RetireEngine("op")]
    dec = msgspec.msgpack.Decoder(scaling.ControlToEngine)
    assert [dec.decode(enc.encode(m)) for m in control] == control
    replies = [scaling.ScalePrepared(2, "op", None, 1.5), scaling.ScaleCommitted(2, "op", "x", 0.1, True)]
    dec = msgspec.msgpack.Decoder(from_engine.EngineHandshakeMessage)
    assert [dec.decode(enc.encode(m)) for m in replies] == replies
    membership = scaling.Membership(3, [scaling.Member(0, 0), scaling.Member(5, 1, scaling.LEAVING),
                                        scaling.Member(7, -1, scaling.JOINING)])
    assert membership.world_size == 2 and membership.routable() == [0]
    out = [scaling.MembershipUpdate(membership, "ipc://x"),
           from_engine.EngineCoreOutputs(5, 1.0, migrated=[scaling.MigratedRequest("r", [1, 2], b"\x00\x01")])]
    dec = msgspec.msgpack.Decoder(from_engine.EngineCoreOutputMessage)
    assert [dec.decode(enc.encode(m)) for m in out] == out
    req = to_engine.EngineCoreRequest("r", [1], SamplingParams(seed=3), resumed_token_ids=[4, 5],
                                      generator_state=b"\x02")
    assert msgspec.msgpack.decode(enc.encode(req), type=to_engine.EngineCoreInput) == req
    call = [scaling.ScaleRequest(3, 1.0, "id"), scaling.StatusRequest()]
    dec = msgspec.msgpack.Decoder(scaling.ScaleCall)
    assert [dec.decode(enc.encode(m)) for m in call] == call


def test_coordinator_resize_tags_snapshots_with_the_epoch() -> None:
    c = Coordinator(2)
    c.handle(EngineLoad(1, 2, 1))
    c.handle(ScaleElasticEP(3, epoch=4))
    snap = c.snapshot()
    assert snap.counts == [[0, 0], [2, 1], [0, 0]] and snap.epoch == 4
    c.handle(ScaleElasticEP(1, epoch=5))
    c.handle(EngineLoad(2, 9, 9))  # a rank that left reports late: ignored
    assert c.snapshot().counts == [[0, 0]] and c.snapshot().epoch == 5


def test_staging_counts_the_next_layouts_p2p_exchange() -> None:
    """A scale stages the next layout's p2p exchange beside the live one: its bytes count in the capacity
    check (CUDA with p2p only; none for one rank), capped by the exchange's memory budget."""
    from types import SimpleNamespace

    import torch

    from elastic.distributed.peer_exchange import ExchangeShape
    from elastic.elastic_ep.capacity import exchange_bytes

    arch = SimpleNamespace(hidden_size=2048, top_k=8)
    from elastic.config.engine import SchedulerConfig

    config = SimpleNamespace(model=SimpleNamespace(arch=arch, dtype=torch.bfloat16), device="cuda:0",
                             scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192),
                             parallel=SimpleNamespace(ep_dispatch="p2p"))
    two = exchange_bytes(config, 2)
    assert two == ExchangeShape.sized(2, 8192, 2048, 8, torch.bfloat16).nbytes > 8192 * 2 * 2 * 2048 * 2
    assert exchange_bytes(config, 1) == 0
    assert exchange_bytes(config, 64) <= 513 * 2**20  # within the budget, whatever the world
    config.parallel.ep_dispatch = "allgather"
    assert exchange_bytes(config, 2) == 0
