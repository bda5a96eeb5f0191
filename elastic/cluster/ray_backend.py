"""`--data-parallel-backend ray`: every engine rank is a Ray actor, placed by Ray over the cluster's nodes.

The API server (or the parent of several) becomes a Ray driver (`ray.init()`: RAY_ADDRESS or a running
local cluster, else a new local one). Each rank gets its own placement group of one bundle (one GPU, or
one CPU on a CPU-only cluster), so Ray decides where it runs; the actor runs the usual engine-core process
body, which connects back to the head over TCP (`--data-parallel-address`, CURVE with the shared secret)
and does the HELLO -> config -> READY handshake like any engine. POST /scale asks Ray for one placement
group per new rank: a rank Ray cannot place within the scale's phase deadline fails its start, and the
scale rolls back. A rank that leaves, or whose scale rolled back, is killed and its placement group
removed. Ray delivers the actor's arguments with its own (pickle-based) serialization inside the Ray
cluster; everything between engines and front ends stays msgspec over our sockets.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
from typing import Any

from elastic.cluster.remote import RemoteNodes
from elastic.config import EngineConfig
from elastic.transport.security import KEY_ENV

logger = logging.getLogger(__name__)

_FORWARDED_ENV = (KEY_ENV, "OMP_NUM_THREADS", "ELASTIC_INJECT_JOIN_FAILURE", "ELASTIC_INJECT_COMMIT_FAILURE")


def _engine_actor_class() -> Any:
    import ray

    @ray.remote(max_restarts=0)
    class EngineActor:
        """One engine rank. `run` blocks for the engine's life (the busy loop), on the actor's main thread."""

        def run(self, config: EngineConfig, engine_id: int, handshake_address: str, log_level: str) -> int:
            from elastic.engine.process import run_engine_core

            try:
                run_engine_core(config, engine_id, handshake_address, None, log_level, False, True)
            except SystemExit as e:
                return e.code if isinstance(e.code, int) else 0
            return 0

        def stop(self) -> None:
            os._exit(0)

    return EngineActor


@dataclasses.dataclass
class _Placed:
    engine: Any  # the launcher's EngineProcess
    group: Any  # ray PlacementGroup
    actor: Any = None
    killed: bool = False


class RayRanks(RemoteNodes):
    """The launcher's `remote` for the Ray backend: every rank is placed by Ray (none is local)."""

    def __init__(self, launcher: Any) -> None:
        super().__init__(launcher)
        import ray

        if not ray.is_initialized():
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            ray.init(log_to_driver=True, configure_logging=False, include_dashboard=False)
            for sig, handler in handlers.items():  # Ray's driver handlers would skip our graceful shutdown
                signal.signal(sig, handler)
        self.ray = ray
        self.actor_class = _engine_actor_class()
        self.placed: dict[int, _Placed] = {}
        self.local_ranks = range(0)

    def is_local(self, engine_id: int) -> bool:
        return False

    async def _report_missing(self) -> None:
        return  # Ray places every rank: there is no node to wait for

    def is_remote(self, engine_id: int) -> bool:
        return engine_id in self.placed

    def expect(self, engine: Any) -> None:
        """An initial rank: Ray places it now."""
        self._place(engine, self.launcher._rank_parallel(engine.index))

    def offers(self, rank: int) -> bool:
        return True  # Ray places every rank

    def start_engine(self, engine: Any, parallel: Any) -> bool:
        self._place(engine, parallel)
        return True

    def _place(self, engine: Any, parallel: Any) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        loop = asyncio.get_running_loop()
        engine.exited = loop.create_future()
        config = self.launcher.config
        gpu = config.device.startswith("cuda")
        bundle = {"GPU": 1.0, "CPU": 1.0} if gpu else {"CPU": 1.0}
        group = placement_group([bundle], strategy="STRICT_PACK", name=f"elastic-engine-{engine.index}")
        placed = self.placed[engine.index] = _Placed(engine, group)
        model = dataclasses.replace(config.model, device="cuda" if gpu else "cpu")  # Ray sets the visible GPU
        engine_config = dataclasses.replace(config, model=model, parallel=parallel)
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        options = dict(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), runtime_env={"env_vars": env},
                       scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
                       name=f"elastic-engine-{engine.index}-{os.getpid()}")
        deadline = config.parallel.scale_phase_timeout
        threading.Thread(target=self._run, args=(placed, options, engine_config, deadline, loop),
                         name=f"ray-engine-{engine.index}", daemon=True).start()
        logger.info("asked Ray to place engine core %d (rank %d, bundle %s)", engine.index,
                    parallel.data_parallel_rank, bundle)

    def _run(self, placed: _Placed, options: dict, config: EngineConfig, deadline: float,
             loop: asyncio.AbstractEventLoop) -> None:
        """Wait for the placement, start the actor, wait for its end; report the end to the launcher."""
        ray, engine = self.ray, placed.engine
        try:
            ray.get(placed.group.ready(), timeout=deadline)
        except Exception as e:  # noqa: BLE001 - GetTimeoutError, or the group was removed meanwhile
            reason = f"could not be placed by Ray within {deadline:g}s ({type(e).__name__}: not enough free " \
                     f"resources for one more rank?)"
            loop.call_soon_threadsafe(self._ended, engine.index, reason)
            return
        if placed.killed:
            loop.call_soon_threadsafe(self._ended, engine.index, "was stopped before it started")
            return
        placed.actor = self.actor_class.options(**options).remote()
        ref = placed.actor.run.remote(config, engine.index, self.launcher.handshake_address,
                                      self.launcher.log_level)
        try:
            code = ray.get(ref)
            reason = "exited with code 0" if code == 0 else f"exited with code {code}"
        except Exception as e:  # noqa: BLE001 - RayActorError: killed, or its node died
            reason = "was killed" if placed.killed else f"died in Ray: {type(e).__name__}: {e}"
        loop.call_soon_threadsafe(self._ended, engine.index, reason)

    def _ended(self, engine_id: int, reason: str) -> None:
        placed = self.placed.pop(engine_id, None)
        if placed is not None:
            self._release(placed)
        engine = self.launcher.engines.get(engine_id)
        if engine is not None and engine.exit_reason is None:
            self.launcher.engine_exited(engine, reason)

    def terminate(self, engine_id: int, kill: bool = False) -> bool:
        placed = self.placed.get(engine_id)
        if placed is None:
            return False
        placed.killed = True
        if placed.actor is not None:
            self.ray.kill(placed.actor, no_restart=True)  # ends `run` with RayActorError -> _ended
        else:
            self._release(placed)  # not started yet: removing the group ends the wait for it
        return True

    def _release(self, placed: _Placed) -> None:
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(placed.group)
        except Exception:  # noqa: BLE001 - already removed, or Ray is shutting down
            pass

    def close(self) -> None:
        for engine_id in list(self.placed):
            self.terminate(engine_id, kill=True)
        for placed in list(self.placed.values()):
            self._release(placed)
        super().close()
