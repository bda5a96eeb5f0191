"""The engine core process: handshake with the front end, then a busy loop: take inputs, step, send outputs.

Sockets (the front end binds, engines connect, so one front end can accept any number of engines):
  handshake  DEALER -> front end ROUTER   HELLO, then (after the model is loaded) READY or a start-up failure
  input      DEALER -> front end ROUTER   the front end addresses this engine by its identity (its index)
  output     PUSH   -> front end PULL     one EngineCoreOutputs batch per step
With several API servers there is one input and one output socket per front end: a request's outputs go
back to the front end it came from. With data parallelism (see dp_engine.py) also:
  coordinator PUSH -> DP coordinator PULL  EngineLoad, StartWaveRequest, WaveComplete
  coordinator SUB  <- DP coordinator XPUB  StartDPWave
Every message is msgspec (msgpack); nothing is ever pickled on a socket.

The process ends when the front end sends ShutdownEngine, on SIGTERM, or when its parent dies (the
death pipe closes). SIGINT is ignored: on Ctrl-C the whole process group gets it, and the API server
decides the order of shutdown.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable

import msgspec
import zmq

from elastic.config import EngineConfig
from elastic.engine.recovery import RankRecovery
from elastic.engine.phase_clock import process_age_s
from elastic.engine.scale_agent import ScaleAgent
from elastic.engine.startup import (OUTPUT_LINGER_MS, apply_parallel_handshake, await_handshake, connect_queues,
                                    prewarm_standby, start_core)
from elastic.engine.waves import DPWaves, RequestWave
from elastic.executor.model_runner import free_device_bytes
from elastic.parent_watch import watch_parent
from elastic.protocol.from_engine import (EngineCoreOutput, EngineCoreOutputs, EngineDead, EngineHello, EngineReady,
                                          RejectedRequest, SchedulerStats, UtilityResult)
from elastic.protocol.scaling import CoordinatorLink, JoinInfo, MigratedRequest
from elastic.protocol.to_engine import (AbortRequests, EngineCoreInput, EngineCoreRequest, HandshakeAddresses,
                                        ShutdownEngine, UtilityCall, engine_identity)
from elastic.transport import security

logger = logging.getLogger(__name__)

_ORPHAN_EXIT_GRACE_S = 5.0


@dataclass
class _Pending:
    """What the next batch to one front end carries besides step outputs."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    rejected: list[RejectedRequest] = field(default_factory=list)
    utility_results: list[UtilityResult] = field(default_factory=list)
    queue_times: dict[str, float] = field(default_factory=dict)
    migrated: list[MigratedRequest] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.outputs or self.rejected or self.utility_results or self.queue_times or self.migrated)


class EngineCoreProc:
    """Owns an EngineCore and its queue sockets (one input and one output per front end); `run()` is the
    busy loop."""

    def __init__(self, core: Any, engine_index: int, input_sockets: list[zmq.Socket],
                 output_sockets: list[zmq.Socket], stats_interval_s: float, dp: DPWaves | None = None,
                 control: zmq.Socket | None = None, join: JoinInfo | None = None,
                 ctx: zmq.Context | None = None) -> None:
        self.core = core
        self.engine_index = engine_index  # the engine id (stable; the DP rank is core.layout.rank)
        self.ctx = ctx
        self.inputs = input_sockets
        self.outputs = output_sockets
        self.stats_interval_s = stats_interval_s
        self.dp = dp
        self.decoder = msgspec.msgpack.Decoder(EngineCoreInput)
        self.encoder = msgspec.msgpack.Encoder()
        self.poller = zmq.Poller()
        for sock in self.inputs:
            self.poller.register(sock, zmq.POLLIN)
        if dp is not None:
            self.poller.register(dp.sub, zmq.POLLIN)  # a paused rank also wakes for START_DP_WAVE
        # Elastic scaling: the handshake socket stays open as the launcher's control channel.
        self.control = control
        self.agent: ScaleAgent | None = None
        self.recovery: RankRecovery | None = None  # fault recovery: a peer died, this rank carries on
        if control is not None:
            self.poller.register(control, zmq.POLLIN)
            self.agent = ScaleAgent(self, control, engine_index, join)
            self.recovery = RankRecovery(self, control, engine_index)
        self.accepting = True  # False while leaving: new requests go back to their front end
        self.extra_sockets: list[zmq.Socket] = []  # opened while serving (closed by the process's exit)
        self.shutdown_requested = False
        self.pending = [_Pending() for _ in self.outputs]
        self.owner: dict[str, int] = {}  # request id -> index of the front end it came from
        self.waiting_since: dict[str, float] = {}  # request id -> when it arrived, until its first step
        self.last_stats: SchedulerStats | None = None
        self.last_send = time.monotonic()
        self.num_steps = 0  # EngineCore.step() calls (dummy steps of an idle DP rank included)
        self.num_requests = 0  # requests accepted
        self.utilities: dict[str, Callable[..., Any]] = {
            "ping": lambda: "pong",
            "stats": lambda: msgspec.structs.asdict(self.core.stats()),
            "num_kv_blocks": lambda: self.core.num_kv_blocks,
            "counters": lambda: {"steps": self.num_steps, "requests": self.num_requests,
                                 "wave": self.core.wave.number,
                                 "running": bool(self.core.global_unfinished),
                                 "pipelined": self.core.pipeline.launched if self.core.pipeline is not None else 0,
                                 "steps_by_kind": dict(self.core.runner.steps_by_kind)},
            "eplb_rebalance": self.core.request_rebalance,
            "eplb_state": self.core.eplb_state,
        }

    def run(self) -> None:
        agent = self.agent
        while True:
            if self._should_exit():
                break
            if not self._must_step():
                # Idle: block in poll (no CPU), waking only to re-send stats now and then (liveness), or
                # every few ms while a scale is being prepared in the background.
                wait_s = max(0.0, self.stats_interval_s - (time.monotonic() - self.last_send))
                if agent is not None and agent.poll_interval_s is not None:
                    wait_s = min(wait_s, agent.poll_interval_s)
                if not self.poller.poll(int(wait_s * 1000)):
                    if agent is not None:
                        agent.poll()
                    self.send_batch([], force=time.monotonic() - self.last_send >= self.stats_interval_s)
                    continue
            else:
                self._await_launch()
            self.drain_inputs()
            if agent is not None:
                agent.poll()
            if self._should_exit():
                break
            outputs: list[EngineCoreOutput] = []
            if self._must_step():
                outputs = self.step()
                if agent is not None:
                    agent.after_step(time.monotonic())  # a scale every rank agreed on in this step's exchange
                if self.dp is not None and not self.core.global_unfinished:
                    self.dp.wave_over()  # every rank saw the same 'nobody has work' at this step
            self.send_batch(outputs)
            if self.dp is not None and not (agent is not None and agent.left):
                self.dp.report_load(self.last_stats or self.core.stats())

    def _await_launch(self) -> None:
        """Pipelined decode: wait for inputs until the next step is due (a request arriving meanwhile is then
        admitted at that step, not one later). The poll's resolution is a millisecond, rounded down."""
        wait_ms = int(self.core.launch_wait_s() * 1000)
        if wait_ms > 0:
            self.poller.poll(wait_ms)

    def _must_step(self) -> bool:
        if self.recovery is not None and self.recovery.broken:
            return False  # a peer failed: wait for the recovery (RecoverLayout), requests kept
        return self.core.global_unfinished and not (self.agent is not None and self.agent.holds_steps)

    def _should_exit(self) -> bool:
        if self.agent is not None and self.agent.exit_requested:
            return True  # a rank that left (scale-down), or a joined one whose scale was rolled back
        return self.shutdown_requested and not self._must_finish_wave()

    def _must_finish_wave(self) -> bool:
        """A DP rank leaving mid-wave would hang its peers in the next collective: it drops its own requests
        (the front end is shutting down) and steps until the wave ends, on every rank at the same step."""
        if self.dp is None or not self.core.global_unfinished:
            return False
        if self.core.has_unfinished_requests():
            self._abort(list(self.core.scheduler.requests))
        return True

    # ---- inputs ---------------------------------------------------------------------------------------
    def drain_inputs(self) -> None:
        for client, sock in enumerate(self.inputs):
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    msg = self.decoder.decode(frame.buffer)
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
                    self._reject_undecodable(frame.buffer, client, e)
                    continue
                self.handle(msg, client)
        if self.agent is not None:
            assert self.control is not None
            while True:
                try:
                    raw = self.control.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.agent.handle_raw(raw)
        if self.dp is not None:
            self.dp.drain()

    def _reject_undecodable(self, payload: Any, client: int, error: Exception) -> None:
        """A request that does not decode (SamplingParams' checks run on decode) is answered, not dropped:
        its front end would wait for it forever. Without a request id there is nobody to answer."""
        try:
            raw = msgspec.msgpack.decode(payload)
        except (msgspec.DecodeError, ValueError):
            raw = None
        if isinstance(raw, list) and len(raw) > 1 and raw[0] == "EngineCoreRequest" and isinstance(raw[1], str):
            self.pending[client].rejected.append(RejectedRequest(raw[1], f"invalid request: {error}"))
        else:
            logger.error("dropping an undecodable input message: %s", error)

    def handle(self, msg: Any, client: int = 0) -> None:
        if isinstance(msg, EngineCoreRequest):
            if not self.accepting:  # leaving: straight back, to go to another engine
                self.pending[client].migrated.append(
                    MigratedRequest(msg.request_id, list(msg.resumed_token_ids), msg.generator_state))
                return
            was_running = self.core.global_unfinished
            try:
                self.core.add_request(msg)
            except Exception as e:  # bad input must never kill the engine
                if not isinstance(e, ValueError):
                    logger.exception("could not add request %s", msg.request_id)
                why = str(e) if isinstance(e, ValueError) else "the engine could not accept this request"
                self.pending[client].rejected.append(RejectedRequest(msg.request_id, why))
                return
            self.num_requests += 1
            self.owner[msg.request_id] = client
            self.waiting_since[msg.request_id] = time.monotonic()
            if self.dp is not None and not was_running:
                self.dp.request_wave()
        elif isinstance(msg, AbortRequests):
            self._abort(msg.request_ids)
        elif isinstance(msg, UtilityCall):
            was_running = self.core.global_unfinished
            self.pending[client].utility_results.append(self.call_utility(msg))
            if self.dp is not None and not was_running and self.core.global_unfinished:
                self.dp.request_wave()  # the call gave this rank work (a rebalance): wake the others
        elif isinstance(msg, ShutdownEngine):
            logger.info("shutdown requested by the front end")
            self.shutdown_requested = True

    # ---- elastic scaling (called by the ScaleAgent) ------------------------------------------------------
    def stop_accepting(self) -> None:
        self.accepting = False

    def resume_accepting(self) -> None:
        self.accepting = True

    def migrate_out(self) -> None:
        """Hand every request back to its front end, with the tokens it has generated (all of them sent
        already: outputs leave after every step, and this batch follows them on the same queue)."""
        for req in self.core.take_requests():
            self.waiting_since.pop(req.request_id, None)
            self.pending[self.owner.pop(req.request_id, 0)].migrated.append(
                MigratedRequest(req.request_id, req.output_token_ids, req.generator_state()))

    def attach_coordinator(self, link: CoordinatorLink) -> None:
        """A single engine growing to several joins the DP coordinator (started for the scale)."""
        assert self.ctx is not None
        self.dp = DPWaves(self.ctx, self.core.layout.rank, link.input, link.engine_pub, self.core.wave)
        self.poller.register(self.dp.sub, zmq.POLLIN)
        self.extra_sockets += self.dp.sockets

    def _abort(self, request_ids: list[str]) -> None:
        for out in self.core.abort_requests(request_ids):
            self.pending[self.owner.pop(out.request_id, 0)].outputs.append(out)
        for rid in request_ids:
            self.waiting_since.pop(rid, None)

    def call_utility(self, call: UtilityCall) -> UtilityResult:
        fn = self.utilities.get(call.method)
        if fn is None:
            return UtilityResult(call.call_id, error=f"unknown utility {call.method!r}; "
                                                     f"available: {sorted(self.utilities)}")
        try:
            return UtilityResult(call.call_id, result=fn(*call.args))
        except Exception as e:  # a failed utility call is that caller's problem, not the engine's
            return UtilityResult(call.call_id, error=f"{type(e).__name__}: {e}")

    # ---- step and outputs -----------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        started = time.monotonic()
        try:
            outputs = self.core.step()
        except Exception as e:  # with peers: a collective that lost one of them (the step appended nothing)
            if self.recovery is None or not self.recovery.step_failed(e):
                raise
            return []
        self.num_steps += 1
        if self.waiting_since:
            self.record_queue_times(started)
        return outputs

    def record_queue_times(self, step_start: float) -> None:
        """A request has left the queue once it has computed tokens or is gone (finished in its first step)."""
        requests = self.core.scheduler.requests
        for rid, arrived in list(self.waiting_since.items()):
            req = requests.get(rid)
            if req is None or req.num_computed_tokens > 0:
                self.pending[self.owner.get(rid, 0)].queue_times[rid] = max(0.0, step_start - arrived)
                del self.waiting_since[rid]

    def send_batch(self, outputs: list[EngineCoreOutput], force: bool = False) -> None:
        """One batch per front end that has something to hear; every front end gets changed stats."""
        stats = self.core.stats()
        for out in outputs:
            client = self.owner.pop(out.request_id, 0) if out.finished else self.owner.get(out.request_id, 0)
            self.pending[client].outputs.append(out)
        stats_changed = stats != self.last_stats
        sent = False
        for client, pending in enumerate(self.pending):
            if not (force or stats_changed or pending):
                continue
            batch = EngineCoreOutputs(
                engine_index=self.engine_index, timestamp=time.time(), outputs=pending.outputs,
                scheduler_stats=stats, queue_times=pending.queue_times or None, rejected=pending.rejected or None,
                utility_results=pending.utility_results or None, migrated=pending.migrated or None)
            self.outputs[client].send(self.encoder.encode(batch), copy=False)
            self.pending[client] = _Pending()
            sent = True
        if sent:
            self.last_stats = stats
            self.last_send = time.monotonic()


# ---- process entry point ------------------------------------------------------------------------------
def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _serve(proc: EngineCoreProc, encoder: msgspec.msgpack.Encoder) -> int:
    """The busy loop until shutdown; a crash is told to every front end (EngineDead) and exits 1."""
    try:
        proc.run()
        return 0
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        logger.exception("engine core %d crashed", proc.engine_index)
        error = f"{type(e).__name__}: {e}"  # one line for the front end; the traceback is in this log
        for sock in proc.outputs:
            sock.send(encoder.encode(EngineDead(proc.engine_index, error)))
        return 1


def _subscribe_waves(ctx: zmq.Context, config: EngineConfig, addresses: HandshakeAddresses,
                     wave: RequestWave) -> DPWaves | None:
    """With DP: subscribe to the coordinator now (its hello is long there when the model is loaded)."""
    if not config.parallel.is_distributed:
        return None
    if addresses.coordinator_address is None or addresses.coordinator_pub_address is None:
        raise RuntimeError("data_parallel_size > 1 but the front end named no DP coordinator")
    rank = config.parallel.data_parallel_rank  # the coordinator's tables are by rank
    return DPWaves(ctx, rank, addresses.coordinator_address, addresses.coordinator_pub_address, wave)


def _say_ready(core: Any, config: EngineConfig, engine_index: int, sockets: list[zmq.Socket],
               encoder: msgspec.msgpack.Encoder) -> None:
    """READY to each front end's input queue (registers our identity with its ROUTER) and, last, to the
    handshake (for an engine started by a scale-up: prepared, waiting for the commit)."""
    ready = encoder.encode(EngineReady(engine_index, core.num_kv_blocks, config.cache.block_size,
                                       config.model.max_model_len, pid=os.getpid(),
                                       free_memory_bytes=free_device_bytes(config),
                                       expert_slot_capacity=core.expert_slot_capacity))
    for sock in sockets:
        sock.send(ready)
    logger.info("engine core %d ready %.2fs after spawn: %d KV blocks", engine_index, process_age_s(),
                core.num_kv_blocks)


def run_engine_core(config: EngineConfig, engine_index: int, handshake_address: str,
                    death_pipe: Connection | None = None, log_level: str = "INFO", local: bool = True,
                    headless: bool = False, standby: bool = False) -> None:
    """Target of the engine core process (multiprocessing 'spawn', or a headless node's main). `standby`:
    started ahead of a scale-up on a spare GPU; it prewarms, then waits for the launcher to claim it."""
    from elastic.logger import setup_logging

    setup_logging(log_level)
    logger.info("engine core %d: process up %.2fs after spawn (interpreter and imports)", engine_index,
                process_age_s())
    signal.signal(signal.SIGTERM, _raise_system_exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if death_pipe is not None:
        watch_parent(death_pipe, "engine core", hard_exit_after_s=_ORPHAN_EXIT_GRACE_S)

    ctx = zmq.Context()
    encoder = msgspec.msgpack.Encoder()
    identity = engine_identity(engine_index)
    handshake = ctx.socket(zmq.DEALER)
    handshake.setsockopt(zmq.IDENTITY, identity)
    handshake.setsockopt(zmq.LINGER, OUTPUT_LINGER_MS)
    security.connect(handshake, handshake_address)
    sockets = [handshake]
    core: Any = None
    exit_code = 0
    try:
        prewarmed = prewarm_standby(config, engine_index) if standby else None
        handshake.send(encoder.encode(EngineHello(engine_index, os.getpid(), local=local, headless=headless)))
        addresses = await_handshake(handshake, msgspec.msgpack.Decoder(HandshakeAddresses), standby)
        config = apply_parallel_handshake(config, addresses)
        wave = RequestWave()
        dp = _subscribe_waves(ctx, config, addresses, wave)
        if dp is not None:
            sockets += dp.sockets
        core = start_core(config, engine_index, wave, dp, handshake, encoder, addresses, prewarmed)
        prewarmed = None
        inputs, outputs = connect_queues(ctx, identity, addresses)
        sockets += inputs + outputs
        _say_ready(core, config, engine_index, [*inputs, handshake], encoder)
        proc = EngineCoreProc(core, engine_index, inputs, outputs, addresses.stats_interval_s, dp,
                              control=handshake, join=addresses.join, ctx=ctx)
        try:
            exit_code = _serve(proc, encoder)
        finally:
            sockets += proc.extra_sockets
    except SystemExit as e:
        exit_code = e.code if isinstance(e.code, int) else 0
    except security.AuthenticationError as e:
        logger.error("engine core %d: %s", engine_index, e)
        exit_code = 1
    finally:
        if core is not None:
            core.shutdown()  # process groups, when there are any
        for sock in sockets:
            sock.close()
        ctx.term()
        logger.info("engine core %d exiting (code %d)", engine_index, exit_code)
    if exit_code:
        raise SystemExit(exit_code)
