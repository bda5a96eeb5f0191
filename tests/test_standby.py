"""Standby engines: started ahead of a scale-up, prewarmed for the layout they will most likely join, claimed
by POST /scale instead of a fresh spawn, and replaced afterwards (cluster/standby.py, engine/standby.py)."""
from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

from server_fixtures import TEST_SERVER_ARGS, ServerProcess, wait_until
from test_scaling_server import ENV, PROMPTS, SCALE_ARGS, Load, model, models, scale  # noqa: F401 - fixtures

from elastic.cluster.devices import rank_device
from elastic.cluster.standby import StandbyPool, guess_size
from elastic.config import ParallelConfig


def test_guess_size_doubles_and_caps() -> None:
    assert [guess_size(rank, 8) for rank in (1, 2, 3, 4, 7)] == [2, 4, 4, 8, 8]  # 1 -> 2 -> 4 -> 8
    assert guess_size(2, 3) == 3  # at most the largest size


class _Launcher:
    """What the pool reads of an EngineLauncher: config, engines, membership; spawn_standby and forget."""

    def __init__(self, device: str, world: int, standby: int | None, largest: int | None = None) -> None:
        parallel = ParallelConfig(data_parallel_size=world, standby_engines=standby, max_data_parallel_size=largest)
        self.config = SimpleNamespace(device=device, parallel=parallel)
        # As the launcher places them: a one-rank layout runs on the device as given ("cuda" is cuda:0).
        self.engines: dict[int, Any] = {i: self._engine(i, rank_device(device, i, world)) for i in range(world)}
        self.membership = SimpleNamespace(world_size=world)
        self.closed = False
        self.handshake_address = "ipc:///tmp/handshake"  # started

    @staticmethod
    def _engine(index: int, device: str, standby: tuple[int, int] | None = None) -> Any:
        return SimpleNamespace(index=index, device=device, standby=standby, exit_reason=None, hello_seen=False,
                               retiring=False)

    def retire(self, engine_id: int) -> None:
        self.engines[engine_id].retiring = True

    def stop_engine(self, engine: Any) -> None:
        engine.exit_reason = "exited with code 0"  # at once, here

    def spawn_standby(self, device: str, rank: int, size: int) -> Any:
        index = max(self.engines) + 1  # ids are never reused
        engine = self.engines[index] = self._engine(index, device, (size, rank))
        return engine

    def forget(self, engine_id: int) -> None:
        del self.engines[engine_id]


def test_pool_fills_spare_gpus_and_claims_the_exact_layout_first() -> None:
    launcher = _Launcher("cuda", 1, None, largest=4)
    pool = StandbyPool(launcher)
    pool.refill()
    assert pool.waiting() == []  # not armed: nothing scales (an offline LLM)
    pool.arm()
    assert [(e.device, e.standby) for e in pool.waiting()] == [("cuda:1", (2, 1)), ("cuda:2", (4, 2)),
                                                                ("cuda:3", (4, 3))]
    assert pool.claim(1, 2).index == 1  # prewarmed for rank 1 of 2
    assert pool.claim(3, 4).index == 3  # the exact one, not the first waiting
    launcher.engines[2].exit_reason = "was killed by SIGKILL"
    assert pool.claim(2, 4) is None  # a dead standby is never claimed
    pool.refill()  # forgets it; cuda:2 is spare again (cuda:1 and cuda:3 are held by the claimed engines)
    assert 2 not in launcher.engines and [(e.device, e.standby) for e in pool.waiting()] == [("cuda:2", (2, 1))]


def test_pool_covers_the_next_ranks_after_a_shrink() -> None:
    """4 GPUs, 1 -> 2 -> 4 -> 2 -> 1: after each scale the waiting standbys cover the ranks a scale-up from the
    current size would start, lowest first."""
    launcher = _Launcher("cuda", 1, None, largest=4)
    pool = StandbyPool(launcher)
    pool.arm()
    grown = [pool.claim(1, 2), pool.claim(2, 4), pool.claim(3, 4)]  # 1 -> 2 -> 4: every claim exact
    assert [e.index for e in grown] == [1, 2, 3] and pool.waiting() == []
    for engine in grown[1:]:  # 4 -> 2: ranks 2 and 3 leave
        engine.exit_reason = "exited with code 0"
        launcher.forget(engine.index)
    launcher.membership.world_size = 2
    pool.refill()
    assert sorted(e.standby for e in pool.waiting()) == [(4, 2), (4, 3)]
    grown[0].exit_reason = "exited with code 0"  # 2 -> 1
    launcher.forget(grown[0].index)
    launcher.membership.world_size = 1
    pool.refill()
    assert sorted((e.standby, e.device) for e in pool.waiting()) == [((2, 1), "cuda:1"), ((4, 2), "cuda:2"),
                                                                     ((4, 3), "cuda:3")]


def test_a_smaller_pool_follows_the_size() -> None:
    """--standby-engines 1 on 4 GPUs: always one standby, for the next rank; after a shrink the one prewarmed for
    a rank that is no longer next is stopped and replaced."""
    launcher = _Launcher("cuda", 1, 1, largest=4)
    pool = StandbyPool(launcher)
    pool.arm()
    assert [(e.device, e.standby) for e in pool.waiting()] == [("cuda:1", (2, 1))]
    joined = pool.claim(1, 2)
    launcher.membership.world_size = 2
    pool.refill()
    stale = pool.waiting()[0]
    assert (stale.device, stale.standby) == ("cuda:2", (4, 2))
    joined.exit_reason = "exited with code 0"  # 2 -> 1
    launcher.forget(joined.index)
    launcher.membership.world_size = 1
    pool.refill()
    assert stale.retiring and stale.exit_reason is not None
    assert [(e.device, e.standby) for e in pool.waiting()] == [("cuda:1", (2, 1))]


def test_pool_is_off_by_default_on_cpu_and_when_asked() -> None:
    for launcher in (_Launcher("cpu", 1, None), _Launcher("cuda", 1, 0, largest=4)):
        pool = StandbyPool(launcher)
        pool.arm()
        assert pool.waiting() == []
    cpu = _Launcher("cpu", 2, 1)
    pool = StandbyPool(cpu)
    pool.arm()
    pool.refill()
    assert [(e.device, e.standby) for e in pool.waiting()] == [("cpu", (4, 2))]


def test_a_standby_engine_joins_under_load(model) -> None:  # noqa: F811 - the fixture
    """1 -> 2 -> 1 with one standby: the scale-up claims it (prewarmed for rank 1 of 2: no model build, no KV
    profiling at the scale), the scale-down frees its place, and a new standby takes it; every request of
    the load completes with the unscaled run's tokens."""
    path, expected = model
    with ServerProcess(path, *TEST_SERVER_ARGS, *SCALE_ARGS, "--standby-engines", "1", env=ENV) as server:
        server.wait_ready()
        standby = wait_until(lambda: _ready_standby(server), 120, "the standby to prewarm")
        assert standby["prewarmed_for"] == {"data_parallel_size": 2, "rank": 1}, standby
        with Load(server) as load:
            for size in (2, 1):
                done = len(load.results)
                assert scale(server, size)["result"] == "succeeded"
                wait_until(lambda: len(load.results) >= done + len(PROMPTS), 120, "requests at the new size")
        load.check(expected)
        log = server.log()
        assert f"engine core {standby['engine_id']} (standby on cpu) claimed for rank 1 of 2" in log, log[-3000:]
        assert re.search(r"engine ready in [\d.]+s \(model 0\.0\ds, kv sizing 0\.0\ds", log), log[-3000:]
        # Each scale's staging reports the engine-thread time of its pieces (what a slow scale spent on what).
        pieces = re.findall(r"operation \w+: staging pieces done in \d+ steps, [\d.]+s after the freeze \((.*)\)", log)
        assert any("place" in p and "experts" in p and "connect" in p for p in pieces), pieces
        refilled = wait_until(lambda: _ready_standby(server), 120, "a new standby")
        assert refilled["engine_id"] > standby["engine_id"]
        assert server.stop() == 0, server.log()[-3000:]
        assert server.leftover_pids() == []
        assert "Traceback" not in server.log(), server.log()[-5000:]


def _ready_standby(server: ServerProcess) -> dict[str, Any] | None:
    standby = server.get("/scale").json()["standby"]
    return standby[0] if standby and standby[0]["ready"] else None




def test_prewarm_fits_only_its_layout(checkpoint_dir) -> None:
    """A standby's head start (CPU: model and KV sizing, nothing compiled) is used only for the layout it was
    built for; claimed for another, it frees its model before the right one is built."""
    import dataclasses

    from elastic.config import create_engine_config
    from elastic.engine.standby import prewarm

    config = create_engine_config(str(checkpoint_dir("qwen3_moe")), device="cpu", dtype="float32", max_model_len=256,
                                  data_parallel_size=2, skip_tokenizer_init=True)
    config = dataclasses.replace(config, parallel=config.parallel.for_rank(1))
    prewarmed = prewarm(config)
    assert prewarmed.num_blocks > 0 and prewarmed.runner is not None
    moe = prewarmed.runner.model.moe_layers()[0]
    assert moe.live.first_slot == moe.live.slots_per_rank  # rank 1's slots
    served = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, store_port=12345))
    assert prewarmed.fits(served)  # the rendezvous address does not matter
    other = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, data_parallel_size=3))
    assert not prewarmed.fits(other)
    prewarmed.release()
    assert prewarmed.runner is None and not prewarmed.fits(served)


def test_standbys_that_keep_dying_are_not_restarted_for_ever() -> None:
    launcher = _Launcher("cuda", 1, 1, largest=2)
    pool = StandbyPool(launcher)
    pool.arm()
    for crash in range(4):
        (engine,) = pool.waiting()
        engine.exit_reason = "was killed by SIGSEGV"
        pool.standby_exited(engine)
    assert pool.waiting() == [] and pool.crashes == 4  # the fourth crash is not replaced until a scale refills
    pool.refill()
    assert len(pool.waiting()) == 1
