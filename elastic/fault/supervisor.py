"""Where every failure is reported, and what happens next.

Detection (all end in `rank_failed`):
  process exit     the launcher watches every engine's and the coordinator's sentinel
  heartbeats       each engine's watcher thread bumps a counter on the launcher's TCPStore; a member whose
                   counter stops for HEARTBEAT_TIMEOUT_S (a frozen process) is killed and counts as dead
  collectives      an engine whose step's collective failed reports RankFault; a collective that timed out
                   on the others while one member is alive but silent means that member hangs: it is killed

Recovery, one at a time (a scale under way ends first: its phases have deadlines):
  1. the survivors' collectives are aborted (abort signal on the store) and they stop stepping, keeping
     their requests; every front end re-runs the dead rank's requests from what it had streamed
  2. shrink_dead: the survivors rebuild their groups without the dead ranks and restore the experts only
     those held; no survivor (a single engine): restart_dead starts a fresh engine
  3. with --restart-failed-ranks: grow back to the size before the failure (a normal scale-up: a
     replacement rank joins beside serving)
A recovery that fails restarts every rank (the last resort that keeps the server up). The DP coordinator is
restarted on its old addresses; engines and front ends reconnect, and its tables refill from their reports.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from elastic.cluster.launcher import EngineLauncher
from elastic.config import EngineConfig
from elastic.elastic_ep.operation import ScaleError
from elastic.elastic_ep.orchestrator import ScaleOrchestrator
from elastic.fault.metrics import FaultMetrics
from elastic.protocol.fault import RankFault, abort_key, heartbeat_key

logger = logging.getLogger(__name__)

# Generous: a busy host must never get a healthy rank killed. ELASTIC_HEARTBEAT_TIMEOUT_S: a test hook.
HEARTBEAT_TIMEOUT_S = float(os.environ.get("ELASTIC_HEARTBEAT_TIMEOUT_S", "20"))
_HEARTBEAT_CHECK_S = 1.0
_HANG_GRACE_S = 2.0  # after a RankFault, time for a dead peer's exit to be seen before blaming a silent one
_MAX_ATTEMPTS = 3
SERVING, RECOVERING, RESTORING = "serving", "recovering", "restoring"


class FaultSupervisor:
    def __init__(self, launcher: EngineLauncher, orchestrator: ScaleOrchestrator, config: EngineConfig,
                 metrics: FaultMetrics | None = None) -> None:
        self.launcher, self.orchestrator, self.metrics = launcher, orchestrator, metrics
        self.restart = config.parallel.restart_failed_ranks
        self.timeout = config.parallel.scale_phase_timeout
        self.dead: dict[int, str] = {}  # engine id -> why, until the recovery removed it
        self.causes: dict[int, str] = {}  # engine id -> how it was found, for a process we kill ourselves
        self.target: int | None = None  # the size to grow back to
        self.failed_at: float | None = None
        self.state = SERVING
        self.last: dict[str, Any] | None = None
        self.task: asyncio.Task | None = None
        self.beats: dict[int, tuple[int, float]] = {}  # engine id -> (counter, when it last changed)
        self.reports: dict[int, str] = {}  # RankFault reports since the last recovery
        self.rebuild = False  # every rank's collective failed and none died: rebuild over all of them
        self.blame: asyncio.Task | None = None
        self.closed = False
        launcher.on_fault = self.collective_failed
        loop = asyncio.get_running_loop()
        self.tasks = {loop.create_task(self._watch_heartbeats(), name="heartbeats")}

    # ---- detection ----------------------------------------------------------------------------------------
    def rank_failed(self, engine_id: int, reason: str) -> bool:
        """An unexpected exit (engine id -1: the DP coordinator). True when a recovery takes charge of it;
        False when nothing can (a single engine with --no-restart-failed-ranks): the old fail-fast applies."""
        if self.closed:
            return False
        if engine_id < 0:
            self._spawn(self._restart_coordinator(reason), "restart-coordinator")
            return True
        members = self.launcher.member_ids()
        if engine_id not in members:
            return True  # already removed by a recovery
        if not self.restart and all(i in self.dead or i == engine_id for i in members):
            return False
        if engine_id not in self.dead:
            cause = self.causes.pop(engine_id, "exit")
            logger.error("engine core %d %s (found by %s); recovering", engine_id, reason, cause)
            self.dead[engine_id] = reason
            if self.metrics is not None:
                self.metrics.failure(cause)
            if self.failed_at is None:
                self.failed_at, self.target = time.monotonic(), self.target or len(members)
            self._signal_abort([i for i in members if i not in self.dead])
        if self.task is None or self.task.done():
            self.task = self._spawn(self._recover(), "recover")
        return True

    def collective_failed(self, report: RankFault) -> None:
        """A member's step lost a peer. If no process died, whoever stays silent hangs."""
        if report.epoch < self.launcher.membership.epoch:
            return  # about a layout already recovered
        self.reports[report.engine_index] = report.error
        if self.state != RECOVERING:  # a scale it was committing will not hear from it: end that scale now
            self.launcher.fail_waiters(report.engine_index, f"engine core {report.engine_index}: {report.error}")
        if self.blame is None or self.blame.done():
            self.blame = self._spawn(self._blame_silent(), "blame")

    async def _blame_silent(self) -> None:
        await asyncio.sleep(_HANG_GRACE_S)
        if self.dead or self.closed or not self.reports:
            return  # a death explains it (the recovery is under way or done)
        members = self.launcher.member_ids()
        silent = [i for i in members if i not in self.reports]
        if not silent:  # every rank failed and none died (a network hiccup): rebuild over all of them
            self.reports.clear()
            logger.error("every rank's collective failed and none died; rebuilding the groups")
            self.failed_at, self.target, self.rebuild = time.monotonic(), len(members), True
            if self.task is None or self.task.done():
                self.task = self._spawn(self._recover(), "recover")
            return
        for engine_id in silent:
            self._kill(engine_id, "collective", "hangs (its peers' collectives timed out)")

    async def _watch_heartbeats(self) -> None:
        while not self.closed:
            await asyncio.sleep(_HEARTBEAT_CHECK_S)
            store = self.launcher.store
            if store is None:
                continue
            now = time.monotonic()
            for engine_id in self.launcher.member_ids():
                count = store.add(heartbeat_key(engine_id), 0)
                last = self.beats.get(engine_id)
                if last is None or last[0] != count:
                    self.beats[engine_id] = (count, now)
                elif count and now - last[1] > HEARTBEAT_TIMEOUT_S and engine_id not in self.dead:
                    self._kill(engine_id, "heartbeat", f"sent no heartbeat for {now - last[1]:.0f}s")

    def _kill(self, engine_id: int, cause: str, why: str) -> None:
        engine = self.launcher.engines.get(engine_id)
        if engine is None or engine.proc is None or not engine.proc.is_alive():
            return
        logger.error("engine core %d (pid %s) %s; killing it", engine_id, engine.pid, why)
        self.causes[engine_id] = cause
        engine.proc.kill()  # its exit is reported like any other (rank_failed)

    def _signal_abort(self, engine_ids: list[int]) -> None:
        """Survivors blocked in a collective with the dead rank get out (their watcher aborts NCCL)."""
        store, epoch = self.launcher.store, str(self.launcher.membership.epoch)
        for engine_id in engine_ids if store is not None else ():
            store.set(abort_key(engine_id), epoch)

    # ---- recovery -------------------------------------------------------------------------------------
    async def _recover(self) -> None:
        """Serve again (shrink to the survivors, or restart), then grow back; again while ranks die."""
        while not self.closed:
            if not await self._serve_again():
                return
            if self.restart and self.target and self.launcher.membership.world_size < self.target:
                self.state = RESTORING
                await self._grow_back(self.target)
            if not self.dead:
                break
        self.state, self.failed_at, self.target, self.rebuild = SERVING, None, None, False

    async def _serve_again(self) -> bool:
        attempts = 0
        while (self.dead or self.rebuild) and not self.closed:
            self.state, self.rebuild = RECOVERING, False
            await self._wait_idle()
            members = self.launcher.member_ids()
            dead = [i for i in members if i in self.dead]
            survivors = [i for i in members if i not in self.dead]
            if survivors:
                summary = await self.orchestrator.shrink_dead(dead)
            else:
                summary = await self.orchestrator.restart_dead(dead)
            self.reports.clear()
            ok = summary["result"] == "succeeded"
            self._record(ok, "serving", summary)
            if ok:
                for engine_id in dead:
                    self.dead.pop(engine_id, None)
                continue
            attempts += 1
            if attempts >= _MAX_ATTEMPTS:
                logger.error("recovery failed %d times; giving up (the server answers 503)", attempts)
                self.state = "failed"
                return False
            for engine_id in survivors:  # the last resort: every rank afresh
                self.dead.setdefault(engine_id, "restarted after a failed recovery")
                self._kill(engine_id, "exit", "is restarted after a failed recovery")
        return not self.closed

    async def _grow_back(self, target: int) -> None:
        for attempt in range(_MAX_ATTEMPTS):
            if self.dead or self.closed:
                return  # another failure: the next round recovers first
            await self._wait_idle()
            try:
                summary = await self.orchestrator.scale(target)
            except ScaleError as e:  # 409: a user's scale got in first; 400: cannot fit any more
                logger.warning("growing back to %d ranks: %s", target, e)
                if e.status != 409:
                    return
                continue
            if summary["result"] in ("succeeded", "noop"):
                self._record(True, "restored", summary)
                return
            logger.warning("growing back to %d ranks (attempt %d): %s", target, attempt + 1, summary.get("error"))

    async def _wait_idle(self) -> None:
        deadline = time.monotonic() + 3 * self.timeout
        while self.orchestrator.tracker.current is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _restart_coordinator(self, reason: str) -> None:
        logger.error("%s; restarting it", reason)
        if self.metrics is not None:
            self.metrics.failure("coordinator")
        started = time.monotonic()
        try:
            await self.launcher.restart_coordinator()
        except Exception:
            logger.exception("the DP coordinator could not be restarted")
            if self.metrics is not None:
                self.metrics.recovery(False, 0.0)
            return
        seconds = time.monotonic() - started
        logger.info("DP coordinator restarted in %.2fs (pid %s)", seconds, self.launcher.coordinator.pid
                    if self.launcher.coordinator else None)
        if self.metrics is not None:
            self.metrics.recovery(True, seconds)

    def _record(self, ok: bool, phase: str, summary: dict[str, Any]) -> None:
        seconds = time.monotonic() - (self.failed_at or time.monotonic())
        self.last = {"phase": phase, "result": summary["result"], "seconds": round(seconds, 3),
                     "size": self.launcher.membership.world_size, "error": summary.get("error")}
        logger.info("recovery: %s %s after %.2fs (%d ranks)%s", phase, summary["result"], seconds,
                    self.launcher.membership.world_size, f": {summary['error']}" if summary.get("error") else "")
        if self.metrics is not None:
            self.metrics.recovery(ok, seconds, phase)

    # ---- status and lifecycle ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"state": self.state, "dead": sorted(self.dead), "target": self.target, "last": self.last}

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def close(self) -> None:
        self.closed = True
        for task in list(self.tasks) + ([self.task] if self.task else []):
            task.cancel()
