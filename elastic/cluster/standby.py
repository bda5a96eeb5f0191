"""Standby engines: engine processes started ahead of a scale-up on this host's spare GPUs.

A scale-up used to start its new ranks from nothing: a fresh interpreter and its imports, a CUDA context,
the model, a KV profiling run, and the JIT compilation of every kernel of the new layout — most of its ten
or more seconds. A standby does all of that before any scale is asked for (engine/standby.py), for the layout
it will most likely join, then waits in its handshake. `EngineLauncher.spawn_joining` claims one instead of
spawning; the pool is refilled after every scale, on the GPUs that are spare then.

A standby is no member: it serves nothing, its exit fails nothing (the pool forgets it), and the launcher
stops it with the others. The pool stays empty until whoever can scale arms it (the scaling orchestrator of
a server): an offline `LLM` never grows, so it starts none.
"""
from __future__ import annotations

import logging
from typing import Any

from elastic.cluster.devices import device_index, first_gpu, max_size, ranks_all_local, visible_gpus

logger = logging.getLogger(__name__)

_MAX_CRASHES = 3


def guess_size(rank: int, largest: int) -> int:
    """The size a standby for rank `rank` most likely joins: the next power of two with room for it
    (autoscalers double), at most `largest`."""
    size = 1
    while size <= rank:
        size *= 2
    return min(size, largest)


class StandbyPool:
    def __init__(self, launcher: Any) -> None:  # EngineLauncher (which owns the pool)
        self.launcher = launcher
        config = launcher.config
        p = config.parallel
        single_host = ranks_all_local(config) and p.is_head
        largest = max_size(config, visible_gpus(config))
        self.largest = largest if largest is not None else 1 << 30
        self.gpus: list[str] = []  # where standbys may run; empty on CPU (any number may)
        if not single_host:
            self.count = 0
        elif config.device.startswith("cuda") and largest is not None:
            self.gpus = [f"cuda:{first_gpu(config) + i}" for i in range(largest)]
            self.count = largest if p.standby_engines is None else p.standby_engines
        else:  # CPU (tests): only when asked for
            self.count = p.standby_engines or 0
        self.armed = False
        self.crashes = 0  # standbys that exited unexpectedly

    def arm(self) -> None:
        """Scale-ups can happen from now on: keep the pool full (at once if the launcher runs already)."""
        self.armed = True
        if self.launcher.handshake_address:
            self.refill()

    def waiting(self) -> list[Any]:  # EngineProcess
        return [e for e in self.launcher.engines.values()
                if e.standby is not None and e.exit_reason is None and not e.retiring]

    def describe(self) -> list[dict[str, Any]]:
        """For GET /scale: each waiting standby, where, for which layout, and whether it finished prewarming."""
        return [{"engine_id": e.index, "device": e.device, "prewarmed_for": {"data_parallel_size": e.standby[0],
                                                                            "rank": e.standby[1]},
                 "ready": e.hello_seen} for e in self.waiting()]

    def refill(self) -> None:
        """Keep standbys for the next `count` ranks from the current size (after start-up, every scale, and a
        standby's exit): one that prewarms for a rank outside them (the server shrank meanwhile) is stopped, and
        each rank without one gets one on a spare device, lowest rank first."""
        if not self.armed or self.count <= 0 or self.launcher.closed or not self.launcher.handshake_address:
            return
        self._forget_dead()
        world = self.launcher.membership.world_size
        wanted = range(world, min(world + self.count, self.largest))
        covered = set()
        for engine in self.waiting():
            if engine.standby[1] in wanted and engine.standby[1] not in covered:
                covered.add(engine.standby[1])
            else:
                logger.info("engine core %d: standby for rank %d no longer needed at %d rank(s); stopping it",
                            engine.index, engine.standby[1], world)
                self.launcher.retire(engine.index)
                self.launcher.stop_engine(engine)
        missing = [rank for rank in wanted if rank not in covered]
        for device, rank in zip(self._spare_devices(), missing):
            self.launcher.spawn_standby(device, rank, guess_size(rank, self.largest))

    def standby_exited(self, engine: Any) -> None:
        """A standby's process ended: replace it (if it was stopped on purpose, or if standbys do not keep dying:
        after `_MAX_CRASHES` unexpected exits, only scales refill the pool)."""
        if not engine.retiring:
            self.crashes += 1
            if self.crashes > _MAX_CRASHES:
                return
        self.refill()

    def claim(self, rank: int, world: int) -> Any:  # EngineProcess | None
        """A standby for rank `rank` of a `world`-rank layout: one prewarmed for exactly that if any."""
        waiting = self.waiting()
        exact = [e for e in waiting if e.standby == (world, rank)]
        engine = (exact or waiting or [None])[0]
        if engine is not None:
            engine.standby = None
            logger.info("engine core %d (standby on %s) claimed for rank %d of %d%s", engine.index, engine.device,
                        rank, world, "" if exact else " (prewarmed for another layout: it rebuilds its model)")
        return engine

    def _spare_devices(self) -> list[str]:
        if not self.gpus:
            return [self.launcher.config.device] * self.count
        # By index: an engine of a one-rank layout runs on the device as given ("cuda" is cuda:0).
        taken = {device_index(e.device) for e in self.launcher.engines.values()
                 if e.exit_reason is None and e.device is not None}
        return [d for d in self.gpus if device_index(d) not in taken]

    def _forget_dead(self) -> None:
        dead = [e.index for e in self.launcher.engines.values() if e.standby is not None and e.exit_reason]
        for engine_id in dead:  # the launcher logged why
            self.launcher.forget(engine_id)
