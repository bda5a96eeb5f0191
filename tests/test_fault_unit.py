"""Fault recovery without processes: the placement over the survivors, and the supervisor's policy over a
launcher and an orchestrator that only record what they are asked (the real ones: test_fault_server.py)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from elastic.engine.reconfigure import resize_placement
from elastic.engine.recovery import placeholders, survivor_placement
from elastic.fault.supervisor import FaultSupervisor
from elastic.protocol.fault import RankFault
from elastic.protocol.scaling import Member, Membership


@pytest.mark.parametrize("experts,redundant,world,survivors", [
    (8, 0, 3, [0, 2]), (8, 0, 3, [1]), (8, 2, 3, [0, 1]), (16, 0, 4, [0, 1, 3]), (16, 4, 2, [1]), (6, 0, 2, [0])])
def test_survivor_placement(experts: int, redundant: int, world: int, survivors: list[int]) -> None:
    layers = 2
    start = (torch.arange(-(-(experts + redundant) // world) * world) % experts).repeat(layers, 1)
    old = resize_placement(start, world, world, experts, redundant)
    compact, new, lost = survivor_placement(old, world, survivors, len(survivors), experts, redundant)
    m = len(survivors)
    old_spr, new_spr = old.shape[1] // world, new.shape[1] // m
    for layer in range(layers):
        assert set(new[layer].tolist()) == set(range(experts))  # every expert has a slot
        held = {e for r in survivors for e in old[layer, r * old_spr:(r + 1) * old_spr].tolist()}
        assert lost[layer] == set(range(experts)) - held
        for expert in held:  # one copy of each expert a survivor holds stays in its slot (nothing to copy)
            assert any(old[layer, r * old_spr + j] == expert == new[layer, new_rank * new_spr + j]
                       for new_rank, r in enumerate(survivors) for j in range(min(old_spr, new_spr)))
    sources = placeholders(compact, new, lost, m)
    for layer in range(layers):  # lost experts' slots copy something their own rank holds: no network
        for slot, expert in enumerate(new[layer].tolist()):
            if expert in lost[layer]:
                rank = slot // new_spr
                assert sources[layer, slot].item() in compact[layer, rank * old_spr:(rank + 1) * old_spr].tolist()


class _Launcher:
    def __init__(self, members: list[int]) -> None:
        self.membership = Membership(0, [Member(i, r) for r, i in enumerate(members)])
        self.store, self.coordinator, self.engines, self.on_fault = None, None, {}, None
        self.coordinator_restarts = 0

    def member_ids(self) -> list[int]:
        return [m.engine_id for m in self.membership.ranked()]

    def fail_waiters(self, engine_id: int, reason: str) -> None:
        self.failed_waiters = getattr(self, "failed_waiters", []) + [engine_id]

    async def restart_coordinator(self) -> None:
        self.coordinator_restarts += 1


class _Orchestrator:
    def __init__(self, launcher: _Launcher) -> None:
        self.launcher, self.calls = launcher, []
        self.tracker = SimpleNamespace(current=None)

    def _set(self, ids: list[int]) -> dict:
        self.launcher.membership = Membership(self.launcher.membership.epoch + 1,
                                              [Member(i, r) for r, i in enumerate(ids)])
        return {"result": "succeeded"}

    async def shrink_dead(self, dead: list[int]) -> dict:
        self.calls.append(("shrink_dead", dead))
        return self._set([i for i in self.launcher.member_ids() if i not in dead])

    async def restart_dead(self, dead: list[int]) -> dict:
        self.calls.append(("restart_dead", dead))
        return self._set([100])

    async def scale(self, target: int) -> dict:
        self.calls.append(("scale", target))
        new = range(200, 200 + target - self.launcher.membership.world_size)
        return self._set(self.launcher.member_ids() + list(new))


def _supervise(members: list[int], restart: bool = True) -> tuple[FaultSupervisor, _Launcher, _Orchestrator]:
    config = SimpleNamespace(parallel=SimpleNamespace(restart_failed_ranks=restart, scale_phase_timeout=5.0))
    launcher = _Launcher(members)
    orchestrator = _Orchestrator(launcher)
    return FaultSupervisor(launcher, orchestrator, config), launcher, orchestrator  # type: ignore[arg-type]


async def _settle(supervisor: FaultSupervisor) -> None:
    for _ in range(100):
        await asyncio.sleep(0.01)
        if supervisor.task is None or supervisor.task.done():
            return


def test_a_dead_rank_shrinks_then_grows_back() -> None:
    async def main() -> None:
        supervisor, launcher, orchestrator = _supervise([0, 1, 2])
        assert supervisor.rank_failed(1, "was killed by SIGKILL")
        assert supervisor.rank_failed(1, "was killed by SIGKILL")  # reported twice: one recovery
        await _settle(supervisor)
        assert orchestrator.calls == [("shrink_dead", [1]), ("scale", 3)]
        assert launcher.membership.world_size == 3 and supervisor.status()["state"] == "serving"
        assert supervisor.last["phase"] == "restored"
        supervisor.close()

    asyncio.run(main())


def test_no_restart_keeps_the_survivors_and_a_lone_engine_fails_fast() -> None:
    async def main() -> None:
        supervisor, launcher, orchestrator = _supervise([0, 1], restart=False)
        assert supervisor.rank_failed(0, "exited with code 1")
        await _settle(supervisor)
        assert orchestrator.calls == [("shrink_dead", [0])] and launcher.member_ids() == [1]
        assert not supervisor.rank_failed(1, "exited with code 1")  # nobody left and no restart: fail fast
        supervisor.close()

    asyncio.run(main())


def test_a_single_engine_is_restarted_and_the_coordinator_too() -> None:
    async def main() -> None:
        supervisor, launcher, orchestrator = _supervise([0])
        assert supervisor.rank_failed(0, "was killed by SIGKILL")
        assert supervisor.rank_failed(-1, "the DP coordinator was killed by SIGKILL")
        await _settle(supervisor)
        await asyncio.sleep(0.05)
        assert orchestrator.calls == [("restart_dead", [0])] and launcher.member_ids() == [100]
        assert launcher.coordinator_restarts == 1
        supervisor.close()

    asyncio.run(main())


def test_a_collective_failure_during_a_scale_ends_its_waits() -> None:
    async def main() -> None:
        supervisor, launcher, _ = _supervise([0, 1, 2])
        supervisor.collective_failed(RankFault(0, "gloo: connection reset", epoch=0))
        assert launcher.failed_waiters == [0] and supervisor.reports == {0: "gloo: connection reset"}
        supervisor.close()

    asyncio.run(main())


def test_stale_collective_reports_blame_nobody() -> None:
    async def main() -> None:
        supervisor, launcher, _ = _supervise([0, 1])
        launcher.membership = Membership(5, launcher.membership.members)
        supervisor.collective_failed(RankFault(0, "gloo: connection reset", epoch=4))  # an older layout's
        assert supervisor.reports == {} and supervisor.blame is None
        supervisor.close()

    asyncio.run(main())
