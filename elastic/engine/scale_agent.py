"""An engine's side of elastic scaling, driven by the launcher over the control channel (the handshake
socket, kept open after READY).

    PrepareScale  -> build the next layout's groups in a background thread while serving and send the
                     non-expert weights to the new ranks assigned to us; or, when leaving, stop taking
                     requests and hand ours back (after up to drain_timeout_s of letting them finish)
                  <- ScalePrepared
    CommitScale   -> with DP > 1, keep stepping until the per-step exchange shows every rank ready (they
                     all switch after the same step); then the commit: barrier on the new group with a
                     deadline (a failure leaves the old layout serving), experts moved, groups swapped,
                     graphs re-captured
                  <- ScaleCommitted (blocking_s: how long this rank served nothing)
    AbortScale    -> drop what was prepared and serve on

A rank started by a scale-up did its preparation at start-up (EngineCore(join=...)); it waits for the
commit without stepping (its groups are not live yet).
"""
from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Union

import msgspec
import torch
import zmq

from elastic.distributed.parallel_state import ParallelState
from elastic.engine.reconfigure import commit_barrier, placement_of, resize_placement, send_dense_weights
from elastic.executor.model_runner import free_device_bytes
from elastic.protocol.fault import RecoverLayout
from elastic.protocol.scaling import (AbortScale, CommitScale, ControlToEngine, JoinInfo, ParallelLayout, PrepareScale,
                                      RetireEngine, ScaleCommitted, ScalePrepared)

logger = logging.getLogger(__name__)

_BACKGROUND_POLL_S = 0.01  # how often an idle engine looks at a preparation running in the background


_base_threads: int | None = None


def set_cpu_threads(world_size: int) -> None:
    """CPU ranks on one host share its cores: each takes its share of the threads the process started
    with (OMP_NUM_THREADS, else torch's default); oversubscribed OpenMP threads make every collective wait,
    and on a busy host even a single rank crawls when its threads spin against other work."""
    global _base_threads
    if _base_threads is None:
        _base_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, _base_threads // world_size))


@dataclass
class _Op:
    op: str
    old_world: int
    new_world: int
    layout: ParallelLayout | None  # None: this engine leaves
    started: float = field(default_factory=time.monotonic)
    standby: ParallelState | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    prepared_sent: bool = False
    commit: CommitScale | None = None
    drain_deadline: float = 0.0
    joined: bool = False  # this engine was started by the scale-up
    needs_agreement: bool = False  # old ranks of a DP group: commit at the step the exchange agrees on

    @property
    def growing(self) -> bool:
        return self.layout is not None and self.layout.world_size > self.old_world


class ScaleAgent:
    def __init__(self, proc: Any, control: zmq.Socket, engine_id: int, join: JoinInfo | None) -> None:
        self.proc, self.control, self.engine_id = proc, control, engine_id
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(Union[ControlToEngine, RecoverLayout])
        self.op: _Op | None = None
        self.exit_requested = False  # a rank that left, once told to go (or a joined rank rolled back)
        self.left = False  # left the layout; still hands back requests that reach it, until RetireEngine
        if join is not None:  # prepared at start-up; READY told the launcher so
            core = proc.core
            self.op = _Op(join.op, join.old_world_size, core.layout.world_size, core.layout, standby=core.parallel,
                          joined=True, prepared_sent=True)
            self.op.done.set()

    # ---- what the busy loop asks ----------------------------------------------------------------------
    @property
    def holds_steps(self) -> bool:
        """A joined rank must not step before its commit: its groups are not live for the others yet."""
        return self.op is not None and self.op.joined

    @property
    def poll_interval_s(self) -> float | None:
        op = self.op
        if op is not None and not op.prepared_sent:
            return _BACKGROUND_POLL_S
        return None

    def handle_raw(self, raw: bytes) -> None:
        try:
            msg = self.decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            logger.error("dropping an undecodable control message: %s", e)
            return
        if isinstance(msg, PrepareScale):
            self._prepare(msg)
        elif isinstance(msg, CommitScale):
            self._commit_requested(msg)
        elif isinstance(msg, AbortScale):
            self._abort(msg.op)
        elif isinstance(msg, RetireEngine):
            self.exit_requested = True
        elif isinstance(msg, RecoverLayout) and self.proc.recovery is not None:
            self.proc.recovery.recover(msg)  # a peer died: carry on over the survivors (engine/recovery.py)

    def poll(self) -> None:
        """Progress that does not need a message: a background preparation done, a leaving engine drained,
        a commit that needs no agreement."""
        op = self.op
        if op is None:
            return
        if op.layout is None and not op.prepared_sent:
            core = self.proc.core
            if core.has_unfinished_requests() and time.monotonic() >= op.drain_deadline:
                self.proc.migrate_out()
            if not core.has_unfinished_requests():
                op.done.set()
        if not op.prepared_sent and op.done.is_set() and self._subscribed():
            op.prepared_sent = True
            self._send(ScalePrepared(self.engine_id, op.op, op.error, time.monotonic() - op.started))
        core = self.proc.core
        if op.commit is not None and op.prepared_sent and not op.needs_agreement and not (
                core.balancer is not None and core.balancer.busy):  # a rebalance under way finishes first
            core.scale_commit_pending = False
            self._commit(time.monotonic())  # nothing to agree on (a single old rank, or a joined one)

    def after_step(self, step_end: float) -> None:
        """Every rank saw all ranks ready in this step's exchange: all switch now, after the same step."""
        core = self.proc.core
        if core.scale_commit_pending and core.parallel is not None and core.parallel.all_scale_ready:
            core.scale_commit_pending = False
            self._commit(step_end)

    # ---- phases -------------------------------------------------------------------------------------------
    def _prepare(self, msg: PrepareScale) -> None:
        if self.op is not None:
            self._abort(self.op.op)  # a newer operation replaces one the launcher gave up on
        op = self.op = _Op(msg.op, msg.old_world_size, msg.new_world_size, msg.layout)
        if msg.coordinator is not None and self.proc.dp is None:
            self.proc.attach_coordinator(msg.coordinator)
        if msg.layout is None:
            self.proc.stop_accepting()
            op.drain_deadline = op.started + msg.drain_timeout_s
            logger.info("engine %d leaves (operation %s): handing its requests back", self.engine_id, msg.op)
            return
        threading.Thread(target=self._build, args=(op, msg), name="scale-prepare", daemon=True).start()

    def _build(self, op: _Op, msg: PrepareScale) -> None:
        """Background: the new groups (their rendezvous waits for every rank, new ones included) and the
        non-expert weights for the new ranks assigned to us. The busy loop keeps serving meanwhile."""
        try:
            assert msg.layout is not None
            device = self.proc.core.config.torch_device
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # a new thread starts on device 0; NCCL must use this rank's GPU
            if msg.layout.is_distributed:
                timeout = datetime.timedelta(seconds=msg.timeout_s)
                op.standby = ParallelState(msg.layout, device, timeout, timeout)
                if msg.send_weights_to:
                    send_dense_weights(self.proc.core.runner.model, op.standby.ep, msg.send_weights_to)
        except Exception as e:  # a peer that never came, or died
            op.error = f"{type(e).__name__}: {e}"
            logger.warning("preparing operation %s failed: %s", op.op, op.error)
        finally:
            if op.cancelled and op.standby is not None:
                op.standby.destroy()
            op.done.set()

    def _commit_requested(self, msg: CommitScale) -> None:
        op = self.op
        if op is None or op.op != msg.op or op.error is not None or not op.prepared_sent:
            error = "not prepared" if op is None or op.error is None else op.error
            self._send(ScaleCommitted(self.engine_id, msg.op, error=error, rolled_back=True))
            return
        op.commit = msg
        if op.joined and os.environ.get("ELASTIC_INJECT_COMMIT_FAILURE") == str(self.engine_id):
            logger.error("engine core %d: injected failure at the commit (ELASTIC_INJECT_COMMIT_FAILURE)",
                         self.engine_id)
            os._exit(3)  # test hook: a new rank dies between its preparation and the commit's barrier
        core = self.proc.core
        core.scale_commit_pending = True  # no rebalance starts from now on
        if core.parallel is not None and not op.joined:  # agree on the step with the other old ranks
            op.needs_agreement = True
            core.start_wave()  # a paused rank steps (dummy batches) until every rank is ready

    def _commit(self, started: float) -> None:
        op = self.op
        assert op is not None and op.commit is not None
        self.op = None
        try:
            if op.layout is None:
                self._leave(op)
            elif op.growing:
                if not self._grow(op):
                    return
            else:
                self._shrink(op)
        except Exception as e:  # past the barrier: the layouts of the ranks may differ; not recoverable
            logger.exception("operation %s failed during the commit", op.op)
            self._send(ScaleCommitted(self.engine_id, op.op, error=f"{type(e).__name__}: {e}"))
            raise
        blocking = time.monotonic() - started
        logger.info("operation %s committed: %d rank(s), served nothing for %.3fs", op.op,
                    op.layout.world_size if op.layout else 0, blocking)
        self._send(ScaleCommitted(self.engine_id, op.op, blocking_s=blocking,
                                  free_memory_bytes=free_device_bytes(self.proc.core.config)))

    def _grow(self, op: _Op) -> bool:
        """Old and new ranks meet on the new group; rank 0 tells the placement and the wave."""
        core, standby = self.proc.core, op.standby
        assert op.layout is not None and standby is not None and op.commit is not None
        maps = placement_of(core.runner.model.moe_layers()) if op.layout.rank == 0 else torch.empty(0, 0)
        try:
            (wave, _), maps = commit_barrier(standby.dp, (core.wave.number, 1), maps.long(), op.commit.timeout_s)
        except Exception as e:
            logger.warning("operation %s: the new group's barrier failed (%s); the old layout serves on", op.op, e)
            if not op.joined:
                standby.destroy()
            self._send(ScaleCommitted(self.engine_id, op.op, error=f"{type(e).__name__}: {e}", rolled_back=True))
            if op.joined:
                self.exit_requested = True
            return False
        arch, parallel = core.config.model.arch, core.config.parallel
        new_maps = resize_placement(maps, op.old_world, op.layout.world_size, arch.num_experts,
                                    parallel.num_redundant_experts)
        core.reconfigure(op.layout, standby, maps, new_maps, standby.ep, op.old_world)
        core.wave.number, core.wave.running = wave, True  # every rank steps once, then the exchange decides
        self._after_switch(op.layout)
        return True

    def _shrink(self, op: _Op) -> None:
        core = self.proc.core
        assert op.layout is not None
        maps = placement_of(core.runner.model.moe_layers())
        arch, parallel = core.config.model.arch, core.config.parallel
        new_maps = resize_placement(maps, op.old_world, op.layout.world_size, arch.num_experts,
                                    parallel.num_redundant_experts)
        transfer = core.parallel.ep if core.parallel is not None else None
        core.reconfigure(op.layout, op.standby, maps, new_maps, transfer, op.old_world)
        self._after_switch(op.layout)

    def _leave(self, op: _Op) -> None:
        core = self.proc.core
        maps = placement_of(core.runner.model.moe_layers())
        arch, parallel = core.config.model.arch, core.config.parallel
        core.leave(maps, resize_placement(maps, op.old_world, op.new_world, arch.num_experts,
                                          parallel.num_redundant_experts), op.new_world)
        self.left = True

    def _after_switch(self, layout: ParallelLayout) -> None:
        if self.proc.recovery is not None:
            self.proc.recovery.watch()  # heartbeats and the abort signal, once there are peers
        if self.proc.dp is not None:
            self.proc.dp.engine_index = layout.rank  # the coordinator's tables are by rank
        if self.proc.core.config.torch_device.type == "cpu":
            set_cpu_threads(layout.world_size)

    def _abort(self, op_id: str) -> None:
        op = self.op
        if op is None or op.op != op_id:
            return
        self.op = None
        op.cancelled = True
        self.proc.core.scale_commit_pending = False
        if op.layout is None:
            self.proc.resume_accepting()
        elif op.done.is_set() and op.standby is not None and not op.joined:
            op.standby.destroy()  # else the background thread destroys it when it returns
        logger.info("operation %s aborted; serving on with the old layout", op_id)

    # ---- helpers --------------------------------------------------------------------------------------------
    def _subscribed(self) -> bool:
        return self.proc.dp is None or self.proc.dp.subscribed

    def _send(self, msg: Any) -> None:
        self.control.send(self.encoder.encode(msg))
