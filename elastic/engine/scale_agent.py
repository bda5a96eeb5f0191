"""An engine's side of elastic scaling, driven by the launcher over the control channel (the handshake
socket, kept open after READY).

    PrepareScale  -> while serving: hold rebalances and freeze the expert placement at a step every old
                     rank agrees on (the per-step DP exchange); then, in a background thread, build the next
                     layout's groups, send the non-expert weights to the new ranks assigned to us, and stage
                     the next layout beside the live one: expert slots filled (from the live ones, moves
                     over the new group; a leaving rank sends its experts to the survivors over a group of
                     the old ranks), placement, EPLB balancer, CUDA graphs captured. A leaving rank also
                     stops taking requests and hands its requests back (after up to drain_timeout_s).
                  <- ScalePrepared
    CommitScale   -> with DP > 1, keep stepping until the per-step exchange shows every rank ready (they
                     all switch after the same step); then the switch: barrier on the new group with a
                     deadline (a failure leaves the old layout serving), staged layout swapped in
                  <- ScaleCommitted (blocking_s: how long this rank served nothing)
    AbortScale    -> drop what was staged and serve on

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

from elastic.distributed.group import StatelessGroup
from elastic.distributed.parallel_state import ParallelState
from elastic.engine.core import StagedLayout
from elastic.engine.reconfigure import commit_barrier, placement_of, send_dense_weights, share_placement
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
    standby: ParallelState | None = None  # the next layout's groups
    transfer: StatelessGroup | None = None  # a shrink's group of the old ranks, for the experts' moves
    staged: StagedLayout | None = None
    old_p2l: torch.Tensor | None = None  # the placement in force, frozen while the operation runs
    frozen: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    prepared_sent: bool = False
    commit: CommitScale | None = None
    drain_deadline: float = 0.0
    joined: bool = False  # this engine was started by the scale-up
    timeout_s: float = 60.0

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
        self._cleanup = threading.Lock()  # a cancelled op's staged state is dropped by whichever side ends last
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
        """Progress that needs no message: a single rank's freeze, a leaving engine drained, a background
        preparation done, a commit that needs no agreement."""
        op, core = self.op, self.proc.core
        if op is None:
            return
        rebalancing = core.balancer is not None and core.balancer.busy  # a rebalance under way finishes first
        if core.parallel is None and not op.frozen.is_set() and not rebalancing:
            self._freeze(op)  # nothing to agree on: a single old rank
        if op.layout is None and not op.prepared_sent:
            if core.has_unfinished_requests() and time.monotonic() >= op.drain_deadline:
                self.proc.migrate_out()
        if not op.prepared_sent and op.done.is_set() and self._drained(op) and self._subscribed():
            op.prepared_sent = True
            self._send(ScalePrepared(self.engine_id, op.op, op.error, time.monotonic() - op.started))
        if op.commit is not None and op.prepared_sent and (op.joined or core.parallel is None) and not rebalancing:
            core.scale_sync = False
            self._commit(time.monotonic())  # nothing to agree on (a single old rank, or a joined one)

    def after_step(self, step_end: float) -> None:
        """Every rank saw all ranks ready in this step's exchange: all freeze the placement, or all switch
        layouts, after this same step."""
        core, op = self.proc.core, self.op
        if op is None or not core.scale_sync or core.parallel is None or not core.parallel.all_scale_ready:
            return
        core.scale_sync = False
        if not op.frozen.is_set():
            self._freeze(op)
        elif op.commit is not None:
            self._commit(step_end)

    # ---- phases -------------------------------------------------------------------------------------------
    def _prepare(self, msg: PrepareScale) -> None:
        if self.op is not None:
            self._abort(self.op.op)  # a newer operation replaces one the launcher gave up on
        op = self.op = _Op(msg.op, msg.old_world_size, msg.new_world_size, msg.layout, timeout_s=msg.timeout_s)
        core = self.proc.core
        core.scale_hold = True  # no rebalance starts from now on: the placement is about to freeze
        if core.parallel is not None:
            core.scale_sync = True  # every old rank agrees on the step at which it freezes
            core.start_wave()
        if msg.coordinator is not None and self.proc.dp is None:
            self.proc.attach_coordinator(msg.coordinator)
        if msg.layout is None:
            self.proc.stop_accepting()
            op.drain_deadline = op.started + msg.drain_timeout_s
            logger.info("engine %d leaves (operation %s): handing its requests back", self.engine_id, msg.op)
        threading.Thread(target=self._build, args=(op, msg), name="scale-prepare", daemon=True).start()

    def _freeze(self, op: _Op) -> None:
        """At a step every old rank agreed on (no rebalance under way, none can start): the placement the
        next layout is computed from."""
        op.old_p2l = placement_of(self.proc.core.runner.model.moe_layers())
        op.frozen.set()

    def _build(self, op: _Op, msg: PrepareScale) -> None:
        """Background, while the busy loop serves: groups, weights for new ranks, the staged layout."""
        core = self.proc.core
        try:
            device = core.config.torch_device
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # a new thread starts on device 0; NCCL must use this rank's GPU
            timeout = datetime.timedelta(seconds=msg.timeout_s)
            if msg.layout is not None and msg.layout.is_distributed:
                op.standby = ParallelState(msg.layout, device, timeout, timeout)
                if msg.send_weights_to:
                    send_dense_weights(core.runner.model, op.standby.ep, msg.send_weights_to)
            if op.new_world < op.old_world and core.parallel is not None:
                op.transfer = StatelessGroup(core.parallel.store, f"xfer/{msg.op}", core.layout.rank, op.old_world,
                                             core.parallel.ep.backend, core.parallel.ep.device,
                                             host=core.layout.store_host, timeout=timeout)
            if not op.frozen.wait(msg.timeout_s) or op.cancelled:
                raise TimeoutError("the ranks did not agree on a step to freeze the expert placement at")
            self._stage(op, msg.timeout_s)
        except Exception as e:  # a peer that never came, or died; the deadline
            op.error = f"{type(e).__name__}: {e}"
            logger.warning("preparing operation %s failed: %s", op.op, op.error)
        finally:
            if op.transfer is not None:
                op.transfer.destroy()  # the experts have moved (or never will)
                op.transfer = None
            op.done.set()
            if op.cancelled:
                self._drop(op)

    def _stage(self, op: _Op, timeout_s: float) -> None:
        core = self.proc.core
        assert op.old_p2l is not None
        if op.layout is None:
            core.send_experts(op.old_p2l, op.new_world, op.transfer)
            return
        old_p2l = op.old_p2l
        if op.growing:  # the new ranks learn the placement from rank 0 (they have none)
            assert op.standby is not None
            old_p2l = share_placement(op.standby.dp, old_p2l, timeout_s)
        transfer = op.standby.ep if op.growing and op.standby is not None else op.transfer
        started = time.monotonic()
        op.staged = core.stage(op.layout, op.standby, old_p2l, transfer, op.old_world)
        logger.info("operation %s: next layout (%d ranks) staged beside serving in %.2fs", op.op,
                    op.layout.world_size, time.monotonic() - started)

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
        if core.parallel is not None and not op.joined:  # agree on the step with the other old ranks
            core.scale_sync = True
            core.start_wave()  # a paused rank steps (dummy batches) until every rank is ready

    def _commit(self, started: float) -> None:
        op = self.op
        assert op is not None and op.commit is not None
        self.op = None
        self.proc.core.scale_hold = False
        try:
            if op.layout is None:
                self.proc.core.leave()
                self.left = True
            elif op.growing:
                if not self._grow(op):
                    return
            else:
                self._switch(op)
        except Exception as e:  # past the barrier: the layouts of the ranks may differ; not recoverable
            logger.exception("operation %s failed during the commit", op.op)
            self._send(ScaleCommitted(self.engine_id, op.op, error=f"{type(e).__name__}: {e}"))
            raise
        blocking = time.monotonic() - started
        logger.info("operation %s committed: %d rank(s), served nothing for %.3fs", op.op,
                    op.layout.world_size if op.layout else 0, blocking)
        core = self.proc.core
        self._send(ScaleCommitted(self.engine_id, op.op, blocking_s=blocking,
                                  free_memory_bytes=free_device_bytes(core.config),
                                  expert_slot_capacity=core.expert_slot_capacity))

    def _grow(self, op: _Op) -> bool:
        """Old and new ranks meet on the new group (rank 0 tells the wave), then switch."""
        core, standby = self.proc.core, op.standby
        assert op.layout is not None and standby is not None and op.commit is not None
        try:
            (wave, _), _ = commit_barrier(standby.dp, (core.wave.number, 1), torch.empty(0, 0, dtype=torch.long),
                                          op.commit.timeout_s)
        except Exception as e:
            logger.warning("operation %s: the new group's barrier failed (%s); the old layout serves on", op.op, e)
            self._send(ScaleCommitted(self.engine_id, op.op, error=f"{type(e).__name__}: {e}", rolled_back=True))
            if op.joined:
                self.exit_requested = True
            else:
                self._drop(op)
            return False
        if not op.joined:
            self._switch(op)
        core.wave.number, core.wave.running = wave, True  # every rank steps once, then the exchange decides
        self._after_switch(op.layout)
        return True

    def _switch(self, op: _Op) -> None:
        assert op.staged is not None and op.layout is not None
        self.proc.core.activate(op.staged)
        self._after_switch(op.layout)

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
        op.frozen.set()  # a background preparation waiting for the freeze gives up
        core = self.proc.core
        core.scale_hold = core.scale_sync = False
        if op.layout is None:
            self.proc.resume_accepting()
        if op.done.is_set() and not op.joined:
            self._drop(op)  # else the background thread drops it when it returns
        logger.info("operation %s aborted; serving on with the old layout", op_id)

    def _drop(self, op: _Op) -> None:
        """A cancelled or failed operation's staged state goes; the live layout is untouched."""
        with self._cleanup:
            if op.joined:
                return
            self.proc.core.discard(op.staged)
            op.staged = None
            if op.standby is not None:
                op.standby.destroy()
                op.standby = None

    # ---- helpers --------------------------------------------------------------------------------------------
    def _drained(self, op: _Op) -> bool:
        return op.layout is not None or not self.proc.core.has_unfinished_requests()

    def _subscribed(self) -> bool:
        return self.proc.dp is None or self.proc.dp.subscribed

    def _send(self, msg: Any) -> None:
        self.control.send(self.encoder.encode(msg))
