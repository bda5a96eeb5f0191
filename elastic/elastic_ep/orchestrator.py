"""The phases of a scale, over the launcher (engine processes, their control channel, the membership).

Scale up, N -> M ranks (the old ranks serve throughout the preparation):
  prepare   start ranks N..M-1 (they build the model without reading the checkpoint, join the new groups,
            receive the non-expert weights from an old rank over them, adopt the KV size); the old ranks
            build the same groups in the background and send those weights
  commit    every old rank stops after one agreed step; all ranks meet on the new group (a barrier with a
            deadline: failing it leaves the old layout serving), experts move onto the new ranks, groups
            swap, graphs are re-captured; then SCALE_ELASTIC_EP to the coordinator and the new membership
            to every front end, which route to the new ranks from then on
Scale down, N -> M:
  prepare   front ends stop routing to ranks M..N-1; those hand their requests back (after drain_timeout),
            each front end re-submits them to a survivor (prompt + tokens so far); the survivors build the
            groups of size M in the background
  commit    one agreed step; experts move off the leaving ranks over the old group; survivors swap groups;
            the new membership goes out; the leaving processes exit
Any failure or deadline before the commit's barrier rolls back (new ranks stopped, prepared groups dropped,
routing restored); the state machine is idle again in every case.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from elastic.cluster.devices import visible_gpus
from elastic.cluster.engine_process import EngineProcess
from elastic.cluster.launcher import EngineLauncher
from elastic.config import EngineConfig
from elastic.elastic_ep.capacity import check_target
from elastic.elastic_ep.metrics import ScaleMetrics
from elastic.elastic_ep.operation import (COMMITTING, FAILED, NOOP, ROLLED_BACK, ROLLING_BACK, SUCCEEDED, ScaleError,
                                          ScaleOperation, ScaleTracker)
from elastic.protocol.fault import RecoverLayout
from elastic.protocol.scaling import (ACTIVE, LEAVING, AbortScale, CommitScale, CoordinatorLink, JoinInfo, Member,
                                      Membership, MembershipUpdate, ParallelLayout, PrepareScale, RetireEngine,
                                      ScaleCommitted, ScalePrepared)
from elastic.protocol.to_coordinator import ScaleElasticEP

logger = logging.getLogger(__name__)

Publish = Callable[[MembershipUpdate], Awaitable[None] | None]
_EXIT_GRACE_S = 5.0  # a process asked to exit (or terminated) gets this long before SIGKILL
# The commit's barrier waits only for ranks that are prepared and told to commit: seconds at most. A rank
# that died meanwhile must not keep the others from serving for a whole phase deadline.
_BARRIER_TIMEOUT_S = 15.0


class _RolledBack(Exception):
    pass


class ScaleOrchestrator:
    """`publish(update)`: deliver a membership record to every front end (a call in the same process, or a
    relay to each API server); `leave_grace_s`: how long a leaving rank keeps handing back requests after
    the new record went out (front ends in other processes may still send it some)."""

    def __init__(self, launcher: EngineLauncher, config: EngineConfig, publish: Publish,
                 metrics: ScaleMetrics | None = None, leave_grace_s: float = 0.0) -> None:
        self.launcher, self.config, self.publish, self.metrics = launcher, config, publish, metrics
        self.leave_grace_s = leave_grace_s
        self.timeout = config.parallel.scale_phase_timeout
        self.tracker = ScaleTracker(launcher.membership.world_size)
        self.next_epoch = launcher.membership.epoch + 1
        self.tasks: set[asyncio.Task] = set()
        # Leaving ranks of the last scale-down, finishing after it (the next operation waits for them).
        self.retiring: asyncio.Task | None = None
        if metrics is not None:
            metrics.set_size(self.tracker.size)
        launcher.standby.arm()  # scale-ups can happen now: standby engines on the spare GPUs

    def status(self) -> dict[str, Any]:
        return {**self.tracker.status(), "standby": self.launcher.standby.describe()}

    async def scale(self, target: Any, drain_timeout: Any = None, operation_id: str | None = None) -> dict[str, Any]:
        """Run (or join, for the same operation id) a scale to `target` ranks; returns its summary when done.
        Raises ScaleError: 400 for an impossible size or argument, 409 while another operation runs."""
        size = self.tracker.size
        target = check_target(self.config, size, target, visible_gpus(self.config), self._survivor_room())
        if isinstance(drain_timeout, bool) or not isinstance(drain_timeout, (int, float, type(None))) or \
                (drain_timeout is not None and not 0 <= drain_timeout <= 3600):
            raise ScaleError(400, f"drain_timeout must be a number of seconds in [0, 3600], got {drain_timeout!r}")
        op, new = self.tracker.begin(target, float(drain_timeout or 0.0), operation_id)
        if new:
            if target == size:
                self.tracker.finish(op, NOOP, size)
            else:
                task = asyncio.get_running_loop().create_task(self._run(op), name=f"scale-{op.operation_id}")
                self.tasks.add(task)  # runs to the end even if the caller goes away
                task.add_done_callback(self.tasks.discard)
        await op.done.wait()
        return {**op.summary(), "joined": not new}  # joined: an earlier call with this operation id ran it

    async def _run(self, op: ScaleOperation) -> None:
        if self.retiring is not None:  # the last scale-down's leaving ranks are gone before anything starts
            await asyncio.wait([self.retiring])
        logger.info("scale %s: %d -> %d ranks", op.operation_id, op.source, op.target)
        if self.metrics is not None:
            self.metrics.set_scaling(True)
        try:
            await (self._grow(op) if op.target > op.source else self._shrink(op))
        except _RolledBack as e:
            self.tracker.finish(op, ROLLED_BACK, op.source, str(e))
        except Exception as e:  # past the point of no return: serving may be broken (engines fail fast)
            logger.exception("scale %s failed", op.operation_id)
            self.tracker.finish(op, FAILED, self.launcher.membership.world_size, f"{type(e).__name__}: {e}")
        else:
            self.tracker.finish(op, SUCCEEDED, op.target)
        logger.info("scale %s: %s (prepare %.2fs, blocking %.3fs, total %.2fs)%s", op.operation_id, op.result,
                    op.prepare_s, op.blocking_s, op.total_s, f": {op.error}" if op.error else "")
        if self.metrics is not None:
            self.metrics.set_scaling(False)
            self.metrics.set_size(self.tracker.size)
            self.metrics.record(op.direction, op.result or FAILED, op.prepare_s, op.blocking_s, op.total_s)
        self.launcher.standby.refill()  # claimed standbys are replaced on the GPUs still spare

    # ---- scale up ---------------------------------------------------------------------------------------
    async def _grow(self, op: ScaleOperation) -> None:
        launcher, n, m = self.launcher, op.source, op.target
        epoch = self._take_epoch()
        old = launcher.membership.ranked()
        host, port = launcher.ensure_store()
        coordinator = await launcher.ensure_coordinator()
        await self._publish(launcher.membership)  # front ends subscribe to a coordinator started just now
        link = CoordinatorLink(coordinator.input, coordinator.engine_pub)
        kv_blocks = min(launcher.engines[x.engine_id].num_kv_blocks for x in old)
        joiners = [launcher.spawn_joining(r, m, epoch, JoinInfo(op.operation_id, n, (r - n) % n, kv_blocks))
                   for r in range(n, m)]
        prepared = [launcher.control(x.engine_id, PrepareScale(
            op.operation_id, n, m, ParallelLayout(epoch, m, x.rank, host, port),
            send_weights_to=[r for r in range(n, m) if (r - n) % n == x.rank], coordinator=link,
            timeout_s=self.timeout), ScalePrepared) for x in old]
        try:
            replies = await _gather([*prepared, *(j.ready_fut for j in joiners)], self.timeout, "prepare")
            _raise_errors(replies[:len(old)])
        except Exception as e:
            await self._roll_back_grow(op, old, joiners, e)
        op.prepare_s = time.monotonic() - op.started
        self.tracker.enter(op, COMMITTING)
        commit = CommitScale(op.operation_id, min(self.timeout, _BARRIER_TIMEOUT_S))
        futures = [launcher.control(i, commit, ScaleCommitted) for i in [x.engine_id for x in old]]
        futures += [launcher.control(j.index, commit, ScaleCommitted) for j in joiners]
        try:  # every answer (a new rank may die now: the old ranks' barrier then fails and they say so)
            results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 2 * self.timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the commit did not complete within {2 * self.timeout:g}s") from None
        olds, news = results[:len(old)], results[len(old):]
        if not any(isinstance(r, BaseException) for r in olds) and all(r.rolled_back for r in olds):
            # The new group's barrier failed on every old rank: nothing changed anywhere.
            cause = next((r for r in news if isinstance(r, BaseException)), None) or RuntimeError(olds[0].error)
            await self._roll_back_grow(op, old, joiners, cause, abort=False)
        _raise_errors(olds + news)
        op.blocking_s = max(r.blocking_s for r in olds)
        members = [Member(x.engine_id, x.rank) for x in old] + [Member(j.index, r) for r, j in zip(range(n, m), joiners)]
        await self._switch(Membership(epoch, members))

    async def _roll_back_grow(self, op: ScaleOperation, old: list[Member], joiners: list[EngineProcess],
                              error: BaseException, abort: bool = True) -> None:
        self.tracker.enter(op, ROLLING_BACK)
        logger.warning("scale %s: rolling back (%s)", op.operation_id, error)
        if abort:
            for x in old:
                self.launcher.control(x.engine_id, AbortScale(op.operation_id))
        await self._stop(joiners)
        raise _RolledBack(f"{type(error).__name__}: {error}")

    # ---- scale down -------------------------------------------------------------------------------------
    async def _shrink(self, op: ScaleOperation) -> None:
        launcher, n, m = self.launcher, op.source, op.target
        epoch, before = self._take_epoch(), launcher.membership
        old = before.ranked()
        survivors, leaving = old[:m], old[m:]
        host, port = launcher.ensure_store()
        draining = Membership(before.epoch, [Member(x.engine_id, x.rank, LEAVING if x.rank >= m else ACTIVE)
                                             for x in old])
        launcher.set_membership(draining)
        await self._publish(draining)  # no new request goes to a leaving rank from here on
        prepared = [launcher.control(x.engine_id, PrepareScale(
            op.operation_id, n, m, ParallelLayout(epoch, m, x.rank, host, port), timeout_s=self.timeout),
            ScalePrepared) for x in survivors]
        prepared += [launcher.control(x.engine_id, PrepareScale(op.operation_id, n, m, None,
                                                                drain_timeout_s=op.drain_timeout), ScalePrepared)
                     for x in leaving]
        try:
            _raise_errors(await _gather(prepared, self.timeout + op.drain_timeout, "prepare"))
        except Exception as e:
            self.tracker.enter(op, ROLLING_BACK)
            logger.warning("scale %s: rolling back (%s)", op.operation_id, e)
            for x in old:
                launcher.control(x.engine_id, AbortScale(op.operation_id))
            launcher.set_membership(before)
            await self._publish(before)
            raise _RolledBack(f"{type(e).__name__}: {e}") from None
        op.prepare_s = time.monotonic() - op.started
        self.tracker.enter(op, COMMITTING)
        commit = CommitScale(op.operation_id, min(self.timeout, _BARRIER_TIMEOUT_S))
        leaving_commits = [launcher.control(x.engine_id, commit, ScaleCommitted) for x in leaving]
        try:  # every rank switches at the same agreed step; the survivors' answers say the new size serves
            results = await _gather([launcher.control(x.engine_id, commit, ScaleCommitted) for x in survivors],
                                    2 * self.timeout, "commit")
        except Exception as e:
            raise RuntimeError(f"the commit did not complete: {e}") from e
        _raise_errors(results)
        op.blocking_s = max(r.blocking_s for r in results)
        engines = [launcher.engines[x.engine_id] for x in leaving]
        for x in leaving:
            launcher.retire(x.engine_id)
        await self._switch(Membership(epoch, [Member(x.engine_id, x.rank) for x in survivors]))
        # Done: the new size serves. The leaving ranks hand back late requests and exit in the background.
        self.retiring = asyncio.get_running_loop().create_task(
            self._retire(op.operation_id, engines, leaving_commits), name=f"retire-{op.operation_id}")
        self.tasks.add(self.retiring)
        self.retiring.add_done_callback(self.tasks.discard)

    async def _retire(self, operation_id: str, engines: list[EngineProcess], commits: list[Any]) -> None:
        """After a scale-down: the leaving ranks' own switch, the grace in which they hand back what API servers
        sent them before the new membership reached those, then their exit."""
        try:
            _raise_errors(await _gather(commits, 2 * self.timeout, "commit"))
        except Exception as e:  # they are stopped below in any case
            logger.warning("scale %s: a leaving rank's commit: %s", operation_id, e)
        await asyncio.sleep(self.leave_grace_s)
        for engine in engines:
            self.launcher.control(engine.index, RetireEngine(operation_id))
        await self._stop(engines, terminate=False)

    # ---- recovery from dead ranks (driven by elastic/fault/) ------------------------------------------------
    async def shrink_dead(self, dead: list[int], operation_id: str | None = None) -> dict[str, Any]:
        """A shrink whose leaving ranks are already dead (or declared dead and killed): no drain and no
        agreed step; the survivors rebuild their groups without them and restore the experts only they held
        (RecoverLayout), and the front ends re-run the dead ranks' requests from what they had streamed. One
        operation like a scale (a POST /scale meanwhile gets 409); idle again afterwards in every case."""
        before = self.launcher.membership
        survivors = [x for x in before.ranked() if x.engine_id not in dead]
        op, _ = self.tracker.begin(len(survivors), 0.0, operation_id)
        self.tracker.enter(op, COMMITTING)  # nothing to prepare: the dead ranks serve nothing already
        try:
            if not survivors:
                raise RuntimeError("no rank survived")
            logger.info("recovery %s: engine(s) %s dead; %d -> %d ranks", op.operation_id, dead,
                        before.world_size, len(survivors))
            epoch = self._take_epoch()
            host, port = self.launcher.ensure_store()
            ranks, n, m = [x.rank for x in survivors], before.world_size, len(survivors)
            replies = await _gather([self.launcher.control(x.engine_id, RecoverLayout(
                op.operation_id, ParallelLayout(epoch, m, r, host, port), n, ranks,
                min(self.timeout, _BARRIER_TIMEOUT_S)), ScaleCommitted) for r, x in enumerate(survivors)],
                2 * self.timeout, "recovery")
            _raise_errors(replies)
            op.blocking_s = max(r.blocking_s for r in replies)
            await self._stop([self.launcher.engines[i] for i in dead if i in self.launcher.engines])
            await self._switch(Membership(epoch, [Member(x.engine_id, r) for r, x in enumerate(survivors)]))
        except Exception as e:
            logger.exception("recovery %s failed", op.operation_id)
            self.tracker.finish(op, FAILED, self.launcher.membership.world_size, f"{type(e).__name__}: {e}")
        else:
            self.tracker.finish(op, SUCCEEDED, len(survivors))
        if self.metrics is not None:
            self.metrics.set_size(self.tracker.size)
        return op.summary()

    async def restart_dead(self, dead: list[int], operation_id: str | None = None) -> dict[str, Any]:
        """No rank survived (a single engine, or all of them died): start one engine afresh (it reads the
        checkpoint), stop what is left of the dead ones, and serve at size 1 (a scale grows it back)."""
        op, _ = self.tracker.begin(1, 0.0, operation_id)
        try:
            epoch = self._take_epoch()
            engine = self.launcher.spawn_joining(0, 1, epoch, None)
            await self._stop([self.launcher.engines[i] for i in dead if i in self.launcher.engines])
            try:
                await asyncio.wait_for(engine.ready_fut, self.timeout)  # type: ignore[arg-type]
            except BaseException:
                await self._stop([engine])
                raise
            await self._switch(Membership(epoch, [Member(engine.index, 0)]))
        except Exception as e:
            logger.exception("restart %s failed", op.operation_id)
            self.tracker.finish(op, FAILED, self.launcher.membership.world_size, f"{type(e).__name__}: {e}")
        else:
            self.tracker.finish(op, SUCCEEDED, 1)
        if self.metrics is not None:
            self.metrics.set_size(self.tracker.size)
        return op.summary()

    # ---- shared -----------------------------------------------------------------------------------------
    async def _switch(self, membership: Membership) -> None:
        """The new layout serves: the coordinator's table, then every front end's routing."""
        self.launcher.set_membership(membership)
        await self.launcher.notify_coordinator(ScaleElasticEP(membership.world_size, membership.epoch))
        await self._publish(membership)

    async def _publish(self, membership: Membership) -> None:
        coordinator = self.launcher.coordinator
        pub = coordinator.addresses.frontend_pub if coordinator is not None and coordinator.addresses else None
        result = self.publish(MembershipUpdate(membership, pub))
        if result is not None:
            await result

    async def _stop(self, engines: list[EngineProcess], terminate: bool = True) -> None:
        """Engines whose exit is expected: wait (SIGTERM first with `terminate`), SIGKILL after a grace."""
        for engine in engines:
            self.launcher.retire(engine.index)
            if terminate:
                self.launcher.stop_engine(engine)  # here, or through the node that runs it
        exits = [e.exited for e in engines if e.exited is not None and not e.exited.done()]
        if exits:
            await asyncio.wait(exits, timeout=_EXIT_GRACE_S)
        for engine in engines:
            if engine.exited is not None and not engine.exited.done():
                logger.warning("engine core %d did not exit; killing it", engine.index)
                self.launcher.stop_engine(engine, kill=True)
        exits = [e.exited for e in engines if e.exited is not None and not e.exited.done()]
        if exits:
            await asyncio.wait(exits, timeout=_EXIT_GRACE_S)
        for engine in engines:
            self.launcher.forget(engine.index)
        self.launcher.standby.refill()  # their GPUs are spare now

    def _take_epoch(self) -> int:
        epoch = max(self.next_epoch, self.launcher.membership.epoch + 1)  # failed attempts use one up too
        self.next_epoch = epoch + 1
        return epoch

    def _survivor_room(self) -> list[tuple[int | None, int | None]]:
        """(free device bytes, expert slot capacity) of each serving engine, in rank order."""
        members = [self.launcher.engines[i] for i in self.launcher.member_ids() if i in self.launcher.engines]
        return [(e.free_memory_bytes, e.expert_slot_capacity) for e in members]


async def _gather(futures: list[Any], timeout: float, phase: str) -> list[Any]:
    """All results, or the first failure (or the deadline) at once; later failures are consumed quietly."""
    for fut in futures:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))
    except asyncio.TimeoutError:
        raise TimeoutError(f"the {phase} phase passed its deadline ({timeout:g}s)") from None


def _raise_errors(replies: list[Any]) -> None:
    """Replies may be exceptions (an engine that exited) or carry an error (rolled back ones too)."""
    errors = [str(r) if isinstance(r, BaseException) else f"engine core {r.engine_index}: {r.error}"
              for r in replies if isinstance(r, BaseException) or getattr(r, "error", None)]
    if errors:
        raise RuntimeError("; ".join(errors))
