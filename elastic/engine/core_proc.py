"""The engine core process: handshake with the front end, then a busy loop: take inputs, step, send outputs.

Sockets (the front end binds, engines connect, so one front end can accept any number of engines):
  handshake  DEALER -> front end ROUTER   HELLO, then (after the model is loaded) READY or a start-up failure
  input      DEALER -> front end ROUTER   the front end addresses this engine by its identity (its index)
  output     PUSH   -> front end PULL     one EngineCoreOutputs batch per step
Every message is msgspec (msgpack); nothing is ever pickled on a socket.

The process ends when the front end sends ShutdownEngine, on SIGTERM, or when its parent dies (the
death pipe closes). SIGINT is ignored: on Ctrl-C the whole process group gets it, and the API server
decides the order of shutdown.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable

import msgspec
import zmq

from elastic.config import EngineConfig
from elastic.protocol.from_engine import (EngineCoreOutput, EngineCoreOutputs, EngineDead, EngineHello, EngineReady,
                                          EngineStartupFailed, RejectedRequest, SchedulerStats, UtilityResult)
from elastic.protocol.to_engine import (AbortRequests, EngineCoreInput, EngineCoreRequest, HandshakeAddresses,
                                        ShutdownEngine, UtilityCall)

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 300.0  # waiting for the front end's addresses after HELLO
_OUTPUT_LINGER_MS = 2000  # let the last batch (or last words) reach the front end on close


def engine_identity(engine_index: int) -> bytes:
    return engine_index.to_bytes(2, "little")


class EngineCoreProc:
    """Owns an EngineCore and its two queue sockets; `run()` is the busy loop."""

    def __init__(self, core: Any, engine_index: int, input_socket: zmq.Socket, output_socket: zmq.Socket,
                 stats_interval_s: float) -> None:
        self.core = core
        self.engine_index = engine_index
        self.input = input_socket
        self.output = output_socket
        self.stats_interval_s = stats_interval_s
        self.decoder = msgspec.msgpack.Decoder(EngineCoreInput)
        self.encoder = msgspec.msgpack.Encoder()
        self.poller = zmq.Poller()
        self.poller.register(self.input, zmq.POLLIN)
        self.shutdown_requested = False
        # What the next batch carries besides step outputs.
        self.pending_outputs: list[EngineCoreOutput] = []
        self.rejected: list[RejectedRequest] = []
        self.utility_results: list[UtilityResult] = []
        self.queue_times: dict[str, float] = {}
        self.waiting_since: dict[str, float] = {}  # request id -> when it arrived, until its first step
        self.last_stats: SchedulerStats | None = None
        self.last_send = time.monotonic()
        self.utilities: dict[str, Callable[..., Any]] = {
            "ping": lambda: "pong",
            "stats": lambda: msgspec.structs.asdict(self.core.stats()),
            "num_kv_blocks": lambda: self.core.num_kv_blocks,
        }

    def run(self) -> None:
        while not self.shutdown_requested:
            if not self.core.global_unfinished:
                # Idle: block in poll (no CPU), waking only to re-send stats now and then (liveness).
                wait_s = max(0.0, self.stats_interval_s - (time.monotonic() - self.last_send))
                if not self.poller.poll(int(wait_s * 1000)):
                    self.send_batch([], force=True)
                    continue
            self.drain_inputs()
            if self.shutdown_requested:
                break
            outputs = self.step() if self.core.global_unfinished else []
            self.send_batch(outputs)

    # ---- inputs ---------------------------------------------------------------------------------------
    def drain_inputs(self) -> None:
        while True:
            try:
                frame = self.input.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = self.decoder.decode(frame.buffer)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
                # Without a decodable request id there is nobody to answer; the front end validates anyway.
                logger.error("dropping an undecodable input message: %s", e)
                continue
            self.handle(msg)

    def handle(self, msg: Any) -> None:
        if isinstance(msg, EngineCoreRequest):
            try:
                self.core.add_request(msg)
            except ValueError as e:  # bad input must never kill the engine
                self.rejected.append(RejectedRequest(msg.request_id, str(e)))
                return
            self.waiting_since[msg.request_id] = time.monotonic()
        elif isinstance(msg, AbortRequests):
            self.pending_outputs.extend(self.core.abort_requests(msg.request_ids))
            for rid in msg.request_ids:
                self.waiting_since.pop(rid, None)
        elif isinstance(msg, UtilityCall):
            self.utility_results.append(self.call_utility(msg))
        elif isinstance(msg, ShutdownEngine):
            logger.info("shutdown requested by the front end")
            self.shutdown_requested = True

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
        outputs = self.core.step()
        if self.waiting_since:
            self.record_queue_times(started)
        return outputs

    def record_queue_times(self, step_start: float) -> None:
        """A request has left the queue once it has computed tokens or is gone (finished in its first step)."""
        requests = self.core.scheduler.requests
        for rid, arrived in list(self.waiting_since.items()):
            req = requests.get(rid)
            if req is None or req.num_computed_tokens > 0:
                self.queue_times[rid] = max(0.0, step_start - arrived)
                del self.waiting_since[rid]

    def send_batch(self, outputs: list[EngineCoreOutput], force: bool = False) -> None:
        stats = self.core.stats()
        if self.pending_outputs:
            outputs = self.pending_outputs + outputs
            self.pending_outputs = []
        if not (force or outputs or self.rejected or self.utility_results or self.queue_times
                or stats != self.last_stats):
            return
        batch = EngineCoreOutputs(
            engine_index=self.engine_index, timestamp=time.time(), outputs=outputs, scheduler_stats=stats,
            queue_times=self.queue_times or None, rejected=self.rejected or None,
            utility_results=self.utility_results or None)
        self.output.send(self.encoder.encode(batch), copy=False)
        self.rejected, self.utility_results, self.queue_times = [], [], {}
        self.last_stats = stats
        self.last_send = time.monotonic()


# ---- process entry point ------------------------------------------------------------------------------
def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _watch_parent(pipe: Connection) -> None:
    """The parent holds the write end and never writes: EOF means it is gone, and so should we be."""
    try:
        pipe.recv_bytes()
    except (EOFError, OSError):
        pass
    logger.warning("the front end process is gone; engine core exiting")
    os.kill(os.getpid(), signal.SIGTERM)


def _handshake(sock: zmq.Socket, decoder: msgspec.msgpack.Decoder) -> HandshakeAddresses:
    if not sock.poll(int(HANDSHAKE_TIMEOUT_S * 1000)):
        raise TimeoutError(f"no answer from the front end to HELLO within {HANDSHAKE_TIMEOUT_S:.0f}s")
    return decoder.decode(sock.recv())


def run_engine_core(config: EngineConfig, engine_index: int, handshake_address: str,
                    death_pipe: Connection | None = None, log_level: str = "INFO", local: bool = True,
                    headless: bool = False) -> None:
    """Target of the engine core process (multiprocessing 'spawn', or a headless node's main)."""
    from elastic.logger import setup_logging, warn_if_hub_kernels_active

    setup_logging(log_level)
    signal.signal(signal.SIGTERM, _raise_system_exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if death_pipe is not None:
        threading.Thread(target=_watch_parent, args=(death_pipe,), name="parent-watch", daemon=True).start()

    ctx = zmq.Context()
    encoder = msgspec.msgpack.Encoder()
    identity = engine_identity(engine_index)
    handshake = ctx.socket(zmq.DEALER)
    handshake.setsockopt(zmq.IDENTITY, identity)
    handshake.setsockopt(zmq.LINGER, _OUTPUT_LINGER_MS)
    handshake.connect(handshake_address)
    sockets = [handshake]
    output: zmq.Socket | None = None
    core: Any = None
    exit_code = 0
    try:
        handshake.send(encoder.encode(EngineHello(engine_index, os.getpid(), local=local, headless=headless)))
        addresses = _handshake(handshake, msgspec.msgpack.Decoder(HandshakeAddresses))
        try:
            from elastic.engine.core import EngineCore

            warn_if_hub_kernels_active(logger)
            core = EngineCore(config)  # loads weights (progress bar), sizes the KV cache
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as e:  # bad checkpoint, OOM, ...: tell the front end why, then exit non-zero
            logger.exception("engine core %d failed to start", engine_index)
            handshake.send(encoder.encode(EngineStartupFailed(engine_index, f"{type(e).__name__}: {e}")))
            raise SystemExit(1) from None

        input_socket = ctx.socket(zmq.DEALER)
        input_socket.setsockopt(zmq.IDENTITY, identity)
        input_socket.setsockopt(zmq.LINGER, 0)
        input_socket.connect(addresses.input_address)
        output = ctx.socket(zmq.PUSH)
        output.setsockopt(zmq.LINGER, _OUTPUT_LINGER_MS)
        output.connect(addresses.output_address)
        sockets += [input_socket, output]
        input_socket.send(b"")  # registers our identity with the front end's ROUTER before READY
        handshake.send(encoder.encode(EngineReady(engine_index, core.num_kv_blocks, config.cache.block_size,
                                                  config.model.max_model_len)))
        proc = EngineCoreProc(core, engine_index, input_socket, output, addresses.stats_interval_s)
        logger.info("engine core %d ready: %d KV blocks", engine_index, core.num_kv_blocks)
        try:
            proc.run()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as e:
            logger.exception("engine core %d crashed", engine_index)
            error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
            output.send(encoder.encode(EngineDead(engine_index, error)))
            exit_code = 1
    except SystemExit as e:
        exit_code = e.code if isinstance(e.code, int) else 0
    finally:
        if core is not None:
            core.shutdown()  # process groups, when there are any
        for sock in sockets:
            sock.close()
        ctx.term()
        logger.info("engine core %d exiting (code %d)", engine_index, exit_code)
    if exit_code:
        raise SystemExit(exit_code)
