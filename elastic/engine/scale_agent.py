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
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import msgspec
import torch
import zmq

from elastic.distributed.parallel_state import ParallelState
from elastic.engine.reconfigure import commit_barrier, placement_of
from elastic.engine.reconfigure import StagedLayout
from elastic.engine.staging import LayoutStaging, PlacementPlan
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
    groups_built: threading.Event = field(default_factory=threading.Event)
    frozen: bool = False  # the placement in force is fixed; the staging pieces run (one per step)
    pieces: deque[Callable[[], None]] = field(default_factory=deque)
    staging: LayoutStaging | None = None
    plan: PlacementPlan | None = None  # computed beside serving, before the freeze
    stage_started: float = 0.0
    piece_s: dict[str, float] = field(default_factory=dict)  # engine-thread time per kind of staging piece
    piece_steps: int = 0
    capturing: bool = False  # the graphs are being captured in the background (staging.connected)
    capture_finished: bool = False
    pieces_done: bool = False
    piece_failed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # pieces_done / capture_finished -> done
    staged: StagedLayout | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    prepared_sent: bool = False
    commit: CommitScale | None = None
    drain_deadline: float = 0.0
    joined: bool = False  # this engine was started by the scale-up
    send_weights_to: list[int] = field(default_factory=list)
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
        self._replaced: ParallelState | None = None  # groups a switch replaced, destroyed once it is reported
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
        """Progress that needs no message: a single rank's staging (one piece per loop), a leaving engine
        drained, the preparation done, a commit that needs no agreement."""
        op, core = self.op, self.proc.core
        if op is None:
            return
        rebalancing = core.balancer is not None and core.balancer.busy  # a rebalance under way finishes first
        if core.parallel is None and op.groups_built.is_set() and not op.done.is_set():
            if not op.frozen and not rebalancing:
                self._freeze(op)  # nothing to agree on: a single old rank
            elif op.frozen:
                self._next_piece(op)
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
        """After every step (the same step on every rank): the next staging piece; or, when every rank
        voted ready in this step's exchange, all freeze the placement, or all switch layouts."""
        core, op = self.proc.core, self.op
        if op is None or core.parallel is None:
            return
        if op.frozen and not op.done.is_set():
            self._next_piece(op)
            return
        if op.groups_built.is_set() and not op.frozen:
            core.scale_agree = True  # this rank can freeze now
        if not core.scale_sync or not core.scale_agree or not core.parallel.all_scale_ready:
            return
        core.scale_agree = False
        if not op.frozen:
            self._freeze(op)
        elif op.commit is not None:
            core.scale_sync = False
            self._commit(step_end)

    # ---- phases -------------------------------------------------------------------------------------------
    def _prepare(self, msg: PrepareScale) -> None:
        if self.op is not None:
            self._abort(self.op.op)  # a newer operation replaces one the launcher gave up on
        op = self.op = _Op(msg.op, msg.old_world_size, msg.new_world_size, msg.layout,
                           send_weights_to=list(msg.send_weights_to), timeout_s=msg.timeout_s)
        core = self.proc.core
        core.scale_hold = True  # no rebalance starts from now on: the placement is about to freeze
        if core.parallel is not None:
            core.scale_sync = True  # every old rank steps until they agree on the step to freeze at
            core.start_wave()
        if msg.coordinator is not None and self.proc.dp is None:
            self.proc.attach_coordinator(msg.coordinator)
        if msg.layout is None:
            self.proc.stop_accepting()
            op.drain_deadline = op.started + msg.drain_timeout_s
            logger.info("engine %d leaves (operation %s): handing its requests back", self.engine_id, msg.op)
        threading.Thread(target=self._build_groups, args=(op,), name="scale-groups", daemon=True).start()

    def _build_groups(self, op: _Op) -> None:
        """Background: the next layout's groups (their rendezvous waits for every rank, new ones included);
        creating them runs no collective, so it cannot get in the way of the live groups."""
        try:
            device = self.proc.core.config.torch_device
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # a new thread starts on device 0
            if op.layout is not None and op.layout.is_distributed:
                timeout = datetime.timedelta(seconds=op.timeout_s)
                op.standby = ParallelState(op.layout, device, timeout, timeout)
            # The plan off the engine's thread; no rebalance can start any more, so the placement read now
            # is the one frozen unless a rebalance under way still changes it (the freeze checks).
            op.plan = self._plan(op, placement_of(self.proc.core.runner.model.moe_layers()))
        except Exception as e:  # a peer that never came, or died; the deadline
            self._fail(op, e)
        finally:
            op.groups_built.set()
            if op.cancelled:
                self._drop(op)

    def _plan(self, op: _Op, placement: torch.Tensor) -> PlacementPlan:
        config = self.proc.core.config
        return PlacementPlan.compute(placement, op.old_world, op.new_world, config.model.arch.num_experts,
                                     config.parallel.num_redundant_experts)

    def _freeze(self, op: _Op) -> None:
        """At a step every old rank agreed on (no rebalance under way, none can start): the placement the
        next layout is computed from; the staging pieces run from the next step on."""
        op.frozen = True
        if op.error is not None:
            op.done.set()
            return
        core = self.proc.core
        frozen = placement_of(core.runner.model.moe_layers())
        plan = op.plan if op.plan is not None and torch.equal(op.plan.old_p2l, frozen) else self._plan(op, frozen)
        op.staging = LayoutStaging(core, op.layout, op.standby, op.old_world, op.new_world, plan,
                                   op.send_weights_to, op.timeout_s)
        op.pieces.extend(op.staging.pieces())
        op.stage_started = time.monotonic()

    def _next_piece(self, op: _Op) -> None:
        """One staging piece (on every rank at the same step), and the graphs in the background as soon as the
        next slots are connected (after the last piece when growing; before the experts move when shrinking).
        Prepared when both are done."""
        try:
            if op.pieces and not op.piece_failed:
                piece, began = op.pieces.popleft(), time.monotonic()
                piece()
                name = piece.__name__.strip("_")
                op.piece_s[name] = op.piece_s.get(name, 0.0) + time.monotonic() - began
                op.piece_steps += 1
        except Exception as e:
            self._fail(op, e)
            op.piece_failed = True
            op.pieces.clear()
        if (op.error is None and op.layout is not None and not op.capturing and op.staging is not None
                and op.staging.connected):
            op.capturing = True
            threading.Thread(target=self._capture, args=(op,), name="scale-capture", daemon=True).start()
        if op.pieces or op.pieces_done:
            return
        logger.info("operation %s: staging pieces done in %d steps, %.2fs after the freeze (%s)", op.op,
                    op.piece_steps, time.monotonic() - op.stage_started,
                    ", ".join(f"{name} {t:.2f}s" for name, t in op.piece_s.items()))
        self.proc.core.scale_sync = False  # the ranks may go idle until the commit
        with op.lock:
            op.pieces_done = True
            if not op.capturing or op.capture_finished:
                op.done.set()

    def _capture(self, op: _Op) -> None:
        try:
            device = self.proc.core.config.torch_device
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)
            assert op.staging is not None
            op.staged = op.staging.capture()
            logger.info("operation %s: next layout (%d ranks) staged beside serving in %.2fs (placement frozen "
                        "%.2fs after the operation began)", op.op, op.new_world, time.monotonic() - op.stage_started,
                        op.stage_started - op.started)
        except Exception as e:
            self._fail(op, e)
        finally:
            with op.lock:
                op.capture_finished = True
                if op.pieces_done:
                    op.done.set()
            if op.cancelled:
                self._drop(op)

    def _fail(self, op: _Op, e: Exception) -> None:
        op.error = op.error or f"{type(e).__name__}: {e}"
        logger.warning("preparing operation %s failed: %s", op.op, op.error)

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
            core.scale_sync = core.scale_agree = True
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
        if self._replaced is not None:  # the old layout's groups, once serving goes on
            self._replaced.destroy()
            self._replaced = None

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
        self._replaced = self.proc.core.activate(op.staged)
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
        core = self.proc.core
        core.scale_hold = core.scale_sync = core.scale_agree = False
        if op.layout is None:
            self.proc.resume_accepting()
        background = not op.groups_built.is_set() or (op.capturing and not op.capture_finished)
        if not background:
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
