"""Front-end side of the engine cores: start the processes, run the handshake, move msgspec messages.

The front end binds every socket and engines connect (ipc:// in a private temp dir for local engines,
tcp:// when an address is configured), so adding engine processes later needs no new listener. A
background task receives output batches and hands them to `on_outputs`; engine death (process
sentinel, or an EngineDead message) is reported to `on_engine_dead` at once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

import msgspec
import zmq
import zmq.asyncio

from elastic.config import EngineConfig
from elastic.engine.core_proc import engine_identity, run_engine_core
from elastic.protocol.from_engine import (EngineCoreOutputMessage, EngineCoreOutputs, EngineDead,
                                          EngineHandshakeMessage, EngineHello, EngineReady, EngineStartupFailed,
                                          SchedulerStats)
from elastic.protocol.to_engine import (AbortRequests, EngineCoreInput, EngineCoreRequest, HandshakeAddresses,
                                        ParallelHandshake, ShutdownEngine, UtilityCall)

logger = logging.getLogger(__name__)

_REGISTRATION_TIMEOUT_S = 30.0
_MAX_IPC_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin for the socket name


class EngineStartupError(RuntimeError):
    """An engine core could not start (bad checkpoint, out of memory, died during start-up)."""


class EngineDeadError(RuntimeError):
    """The engine core serving a request is gone."""


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exited"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        hint = " (possibly the out-of-memory killer; see dmesg)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode}"


@dataclass
class EngineHandle:
    index: int
    identity: bytes
    proc: BaseProcess | None = None  # None for an engine started elsewhere (headless, remote)
    death_writer: Connection | None = None  # held open for the engine's lifetime; closing it stops the engine
    pid: int | None = None
    num_kv_blocks: int = 0
    ready: bool = False
    dead_reason: str | None = None
    stats: SchedulerStats | None = None
    num_in_flight: int = 0  # engine requests routed here and not finished
    exited: asyncio.Future | None = field(default=None, repr=False)


class EngineCoreClient:
    """asyncio client for one front end and `data_parallel_size` engine cores (1 until DP lands)."""

    def __init__(self, config: EngineConfig, *, on_outputs: Callable[[EngineCoreOutputs], None],
                 on_engine_dead: Callable[[int, str], None], address: str | None = None,
                 handshake_port: int = 0, log_level: str = "INFO", stats_interval_s: float = 5.0) -> None:
        self.config = config
        self.on_outputs = on_outputs
        self.on_engine_dead = on_engine_dead
        self.address = address  # None: ipc (all engines local)
        self.handshake_port = handshake_port
        self.log_level = log_level
        self.stats_interval_s = stats_interval_s
        n = config.parallel.data_parallel_size
        if n != 1:  # DP ranks step in lockstep; serving them needs the DP coordinator's request waves
            raise NotImplementedError("the server runs one engine core; data_parallel_size > 1 needs the DP "
                                      "coordinator wired into the front end")
        self.engines = [EngineHandle(i, engine_identity(i)) for i in range(n)]
        self.encoder = msgspec.msgpack.Encoder()
        self.output_decoder = msgspec.msgpack.Decoder(EngineCoreOutputMessage)
        self.ctx = zmq.Context()
        self.actx = zmq.asyncio.Context.shadow(self.ctx)
        self.tmpdir: str | None = None
        self.handshake_address = self.input_address = self.output_address = ""
        self.sockets: list[Any] = []
        self.recv_task: asyncio.Task | None = None
        self.utility_calls: dict[int, tuple[int, asyncio.Future]] = {}
        self.call_ids = itertools.count()
        self.closing = False
        self.closed = False

    # ---- start-up -------------------------------------------------------------------------------------
    def _bind(self) -> None:
        if self.address is None:
            base = tempfile.gettempdir()
            if len(base) > _MAX_IPC_PATH - 30:
                base = "/tmp"  # ipc paths are limited to ~107 bytes
            self.tmpdir = tempfile.mkdtemp(prefix="elastic-", dir=base)
            addr = {name: f"ipc://{self.tmpdir}/{name}" for name in ("handshake", "input", "output")}
        else:
            addr = {name: f"tcp://{self.address}:0" for name in ("handshake", "input", "output")}
            if self.handshake_port:
                addr["handshake"] = f"tcp://{self.address}:{self.handshake_port}"
        self.handshake = self.actx.socket(zmq.ROUTER)
        self.input = self.ctx.socket(zmq.ROUTER)
        self.output = self.actx.socket(zmq.PULL)
        self.sockets = [self.handshake, self.input, self.output]
        self.input.setsockopt(zmq.ROUTER_MANDATORY, 1)  # raise on an unknown/vanished engine, never drop
        self.input.setsockopt(zmq.SNDHWM, 0)  # sends never block the event loop
        self.output.setsockopt(zmq.RCVHWM, 0)
        for sock in self.sockets:
            sock.setsockopt(zmq.LINGER, 0)
        self.handshake.bind(addr["handshake"])
        self.input.bind(addr["input"])
        self.output.bind(addr["output"])
        # With tcp port 0, the real ports are only known now.
        self.handshake_address = self.handshake.getsockopt_string(zmq.LAST_ENDPOINT)
        self.input_address = self.input.getsockopt_string(zmq.LAST_ENDPOINT)
        self.output_address = self.output.getsockopt_string(zmq.LAST_ENDPOINT)

    def _spawn(self, engine: EngineHandle) -> None:
        # spawn, not fork: torch (CUDA, OpenMP threads) is not fork-safe.
        mp = multiprocessing.get_context("spawn")
        reader, writer = mp.Pipe(duplex=False)
        config = dataclasses.replace(self.config, parallel=self.config.parallel.for_rank(engine.index))
        proc = mp.Process(target=run_engine_core, name=f"EngineCore_{engine.index}",
                          args=(config, engine.index, self.handshake_address, reader, self.log_level))
        proc.start()
        reader.close()  # only the child keeps the read end: our exit then closes the pipe
        engine.proc, engine.death_writer, engine.pid = proc, writer, proc.pid
        loop = asyncio.get_running_loop()
        engine.exited = loop.create_future()
        loop.add_reader(proc.sentinel, self._on_process_exit, engine)
        logger.info("started engine core %d (pid %d)", engine.index, proc.pid)

    async def start(self) -> None:
        """Spawn the engines and wait until every one is READY; raises EngineStartupError otherwise."""
        try:
            self._bind()
            for engine in self.engines:
                self._spawn(engine)
            await self._handshake()
            await self._await_registrations()
        except BaseException:
            self.close()
            raise
        self.recv_task = asyncio.get_running_loop().create_task(self._recv_loop(), name="engine-outputs")

    async def _handshake(self) -> None:
        decoder = msgspec.msgpack.Decoder(EngineHandshakeMessage)
        by_identity = {e.identity: e for e in self.engines}
        while not all(e.ready for e in self.engines):
            recv = asyncio.ensure_future(self.handshake.recv_multipart())
            exits = [e.exited for e in self.engines if e.exited is not None]
            try:
                await asyncio.wait([recv, *exits], return_when=asyncio.FIRST_COMPLETED)
                if not recv.done():  # an engine exited: its last words (why) may still be on the way
                    await asyncio.wait([recv], timeout=0.5)
            finally:
                if not recv.done():
                    recv.cancel()
            if recv.cancelled():
                dead = next(e for e in self.engines if e.dead_reason is not None)
                raise EngineStartupError(f"engine core {dead.index} {dead.dead_reason} during start-up")
            identity, payload = recv.result()
            engine = by_identity.get(identity)
            msg = decoder.decode(payload)
            if engine is None or msg.engine_index != engine.index:
                logger.warning("ignoring a handshake message from an unexpected engine: %r", msg)
                continue
            if isinstance(msg, EngineHello):
                engine.pid = msg.pid
                parallel = ParallelHandshake(
                    data_parallel_size=self.config.parallel.data_parallel_size, data_parallel_rank=engine.index,
                    data_parallel_master_ip=self.address or "127.0.0.1")
                reply = HandshakeAddresses(self.input_address, self.output_address, parallel,
                                           stats_interval_s=self.stats_interval_s)
                await self.handshake.send_multipart([identity, self.encoder.encode(reply)])
                logger.info("engine core %d (pid %d) said hello; loading the model", engine.index, msg.pid)
            elif isinstance(msg, EngineReady):
                engine.num_kv_blocks, engine.ready = msg.num_kv_blocks, True
                logger.info("engine core %d ready: %d KV blocks of %d tokens", engine.index, msg.num_kv_blocks,
                            msg.block_size)
            elif isinstance(msg, EngineStartupFailed):
                raise EngineStartupError(f"engine core {engine.index} failed to start: {msg.error}")

    async def _await_registrations(self) -> None:
        """Each engine sends one empty frame on the input socket; until then our ROUTER cannot address it."""
        pending = {e.identity for e in self.engines}
        inbox = zmq.asyncio.Socket.from_socket(self.input)

        async def receive_all() -> None:
            while pending:
                identity, _ = await inbox.recv_multipart()
                pending.discard(identity)

        try:
            await asyncio.wait_for(receive_all(), _REGISTRATION_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise EngineStartupError("engine cores said READY but never connected to the input queue") from None

    # ---- steady state ---------------------------------------------------------------------------------
    def _on_process_exit(self, engine: EngineHandle) -> None:
        assert engine.proc is not None
        asyncio.get_running_loop().remove_reader(engine.proc.sentinel)
        engine.proc.join(timeout=1.0)  # the sentinel fires as the process exits; reap it for its exit code
        self._mark_dead(engine, describe_exit(engine.proc.exitcode))
        if engine.exited is not None and not engine.exited.done():
            engine.exited.set_result(engine.proc.exitcode)

    def _mark_dead(self, engine: EngineHandle, reason: str) -> None:
        if engine.dead_reason is not None:
            return
        engine.dead_reason = reason
        for call_id, (index, fut) in list(self.utility_calls.items()):
            if index == engine.index and not fut.done():
                fut.set_exception(EngineDeadError(f"engine core {engine.index} {reason}"))
                del self.utility_calls[call_id]
        if self.closing:
            logger.info("engine core %d (pid %s) %s", engine.index, engine.pid, reason)
            return
        if engine.ready:
            logger.error("engine core %d (pid %s) died: it %s; failing its in-flight requests",
                         engine.index, engine.pid, reason)
            self.on_engine_dead(engine.index, f"engine core {engine.index} {reason}")

    async def _recv_loop(self) -> None:
        while True:
            payload = await self.output.recv(copy=False)
            try:
                msg = self.output_decoder.decode(payload.buffer)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.error("dropping an undecodable engine output: %s", e)
                continue
            if isinstance(msg, EngineDead):
                self._mark_dead(self.engines[msg.engine_index], f"crashed: {msg.error}")
                continue
            engine = self.engines[msg.engine_index]
            if msg.scheduler_stats is not None:
                engine.stats = msg.scheduler_stats
            for result in msg.utility_results or ():
                entry = self.utility_calls.pop(result.call_id, None)
                if entry is not None and not entry[1].done():
                    if result.error is not None:
                        entry[1].set_exception(RuntimeError(result.error))
                    else:
                        entry[1].set_result(result.result)
            try:
                self.on_outputs(msg)
            except Exception:  # a bug in output handling must not stop the loop that serves everyone
                logger.exception("error while processing engine outputs")

    @property
    def is_ready(self) -> bool:
        return bool(self.engines) and all(e.ready for e in self.engines) and not self.closed

    @property
    def dead_reason(self) -> str | None:
        reasons = [f"engine core {e.index} {e.dead_reason}" for e in self.engines if e.dead_reason]
        return "; ".join(reasons) or None

    def pick_engine(self) -> EngineHandle:
        """The live engine with the fewest requests in flight (our own count: stats lag a step)."""
        live = [e for e in self.engines if e.ready and e.dead_reason is None]
        if not live:
            raise EngineDeadError(self.dead_reason or "no engine core is ready")
        return min(live, key=lambda e: (e.num_in_flight, e.index))

    def _send(self, engine: EngineHandle, msg: EngineCoreInput) -> None:
        if engine.dead_reason is not None:
            raise EngineDeadError(f"engine core {engine.index} {engine.dead_reason}")
        try:
            self.input.send_multipart([engine.identity, self.encoder.encode(msg)], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            raise EngineDeadError(f"cannot reach engine core {engine.index}: {e}") from e

    def add_requests(self, engine: EngineHandle, requests: list[EngineCoreRequest]) -> None:
        for req in requests:
            self._send(engine, req)
        engine.num_in_flight += len(requests)

    def release(self, engine_index: int, num_requests: int) -> None:
        engine = self.engines[engine_index]
        engine.num_in_flight = max(0, engine.num_in_flight - num_requests)

    def abort(self, engine_index: int, request_ids: list[str]) -> None:
        engine = self.engines[engine_index]
        if request_ids and engine.dead_reason is None and not self.closed:
            try:
                self._send(engine, AbortRequests(request_ids))
            except EngineDeadError as e:
                logger.warning("could not abort %d request(s): %s", len(request_ids), e)

    async def call_utility(self, engine_index: int, method: str, *args: Any, timeout: float = 30.0) -> Any:
        call_id = next(self.call_ids)
        fut = asyncio.get_running_loop().create_future()
        self.utility_calls[call_id] = (engine_index, fut)
        try:
            self._send(self.engines[engine_index], UtilityCall(call_id, method, list(args)))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.utility_calls.pop(call_id, None)

    # ---- shutdown -------------------------------------------------------------------------------------
    async def shutdown(self, timeout: float = 5.0) -> None:
        """Ask every engine to exit, wait a little, then make sure (terminate, kill) and clean up."""
        if self.closed:
            return
        self.closing = True
        for engine in self.engines:
            if engine.ready and engine.dead_reason is None:
                try:
                    self._send(engine, ShutdownEngine())
                except EngineDeadError:
                    pass
        exits = [e.exited for e in self.engines if e.exited is not None and not e.exited.done()]
        if exits:
            await asyncio.wait(exits, timeout=timeout)
        self.close()

    def close(self) -> None:
        """Synchronous, idempotent last resort: no engine process, socket or socket file outlives it."""
        if self.closed:
            return
        self.closing = self.closed = True
        if self.recv_task is not None:
            self.recv_task.cancel()
        for engine in self.engines:
            proc = engine.proc
            if proc is None:
                continue
            try:
                asyncio.get_running_loop().remove_reader(proc.sentinel)
            except (RuntimeError, ValueError, OSError):
                pass  # no running loop (atexit) or already removed
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
            if proc.is_alive():
                logger.warning("engine core %d did not exit on SIGTERM; killing it", engine.index)
                proc.kill()
                proc.join(timeout=5.0)
            if engine.death_writer is not None:
                engine.death_writer.close()
        for fut in [fut for _, fut in self.utility_calls.values()]:
            if not fut.done():
                fut.set_exception(EngineDeadError("the engine client is shut down"))
        self.utility_calls.clear()
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        for engine in self.engines:
            if engine.exited is not None and not engine.exited.done():
                engine.exited.cancel()
