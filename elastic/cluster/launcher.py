"""Start and watch the engine core processes (and, with data parallelism, the DP coordinator).

The launcher binds the handshake socket, hosts the TCPStore rendezvous of the ranks' stateless process
groups (engines only connect to it), spawns one engine per DP rank, answers each HELLO with the front ends'
queue addresses and the parallel layout, and waits for every READY. Afterwards it watches the processes'
sentinels and reports any exit through `on_exit` at once. It is used by the front end itself (one API
server) or by the parent of several API servers (`--api-server-count`), which then only relays deaths.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import signal
import tempfile
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

import msgspec
import zmq
import zmq.asyncio

from elastic.cluster.coordinator import CoordinatorAddresses, CoordinatorProcess
from elastic.config import EngineConfig, ParallelConfig
from elastic.engine.process import run_engine_core
from elastic.protocol.from_engine import EngineHandshakeMessage, EngineHello, EngineReady, EngineStartupFailed
from elastic.protocol.to_engine import HandshakeAddresses, engine_identity

logger = logging.getLogger(__name__)

_MAX_IPC_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin for the socket name
KILL_GRACE_S = 2.0  # after SIGTERM, before SIGKILL, when the lockstep of DP ranks is broken anyway


class EngineStartupError(RuntimeError):
    """An engine core could not start (bad checkpoint, out of memory, died during start-up)."""


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exited"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        hint = " (possibly the out-of-memory killer; see dmesg)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode}"


def make_socket_dir() -> str:
    """A private directory for ipc:// socket files (ipc paths are limited to ~107 bytes)."""
    base = tempfile.gettempdir()
    if len(base) > _MAX_IPC_PATH - 30:
        base = "/tmp"
    return tempfile.mkdtemp(prefix="elastic-", dir=base)


def rank_device(device: str, rank: int, world: int) -> str:
    """One GPU per DP rank: engine i uses cuda:i (cuda:N+i when a first device N is given)."""
    if world == 1 or not device.startswith("cuda"):
        return device
    first = int(device.split(":")[1]) if ":" in device else 0
    return f"cuda:{first + rank}"


@dataclass
class EngineProcess:
    index: int
    identity: bytes
    proc: BaseProcess | None = None
    death_writer: Connection | None = None  # held open for the engine's lifetime; closing it stops the engine
    pid: int | None = None
    num_kv_blocks: int = 0
    ready: bool = False
    exit_reason: str | None = None
    exited: asyncio.Future | None = field(default=None, repr=False)


class EngineLauncher:
    """`on_exit(index, reason)`: an engine process exited (index -1: the DP coordinator did)."""

    def __init__(self, config: EngineConfig, *, on_exit: Callable[[int, str], None], socket_dir: str | None,
                 address: str | None = None, handshake_port: int = 0, log_level: str = "INFO",
                 stats_interval_s: float = 5.0) -> None:
        self.config = config
        self.on_exit = on_exit
        self.socket_dir = socket_dir  # None: tcp on `address`
        self.address = address
        self.handshake_port = handshake_port
        self.log_level = log_level
        self.stats_interval_s = stats_interval_s
        n = config.parallel.data_parallel_size
        self.engines = [EngineProcess(i, engine_identity(i)) for i in range(n)]
        self.host = address or "127.0.0.1"
        self.ctx = zmq.asyncio.Context()
        self.handshake: Any = None
        self.store: Any = None  # torch TCPStore master (DP > 1)
        self.coordinator: CoordinatorProcess | None = None
        self.closed = False

    @property
    def data_parallel(self) -> bool:
        return len(self.engines) > 1

    def _address(self, name: str) -> str:
        return f"ipc://{self.socket_dir}/{name}" if self.socket_dir else f"tcp://{self.host}:0"

    # ---- start-up -------------------------------------------------------------------------------------
    async def start_coordinator(self) -> CoordinatorAddresses | None:
        """With DP > 1: start the coordinator and return its bound addresses (front ends subscribe first)."""
        if not self.data_parallel:
            return None
        names = CoordinatorAddresses(*(self._address(n) for n in ("coord-in", "coord-engines", "coord-frontends")))
        self.coordinator = CoordinatorProcess(names, len(self.engines), self.log_level)
        loop = asyncio.get_running_loop()
        addresses = await loop.run_in_executor(None, self.coordinator.wait_addresses)
        loop.add_reader(self.coordinator.sentinel, self._on_coordinator_exit)
        logger.info("started the DP coordinator (pid %d)", self.coordinator.pid)
        return addresses

    async def start(self, frontend_inputs: list[str], frontend_outputs: list[str]) -> None:
        """Spawn every engine and wait until each is READY; raises EngineStartupError otherwise."""
        self.handshake = self.ctx.socket(zmq.ROUTER)
        self.handshake.setsockopt(zmq.LINGER, 0)
        if self.socket_dir is None and self.handshake_port:
            self.handshake.bind(f"tcp://{self.host}:{self.handshake_port}")
        else:
            self.handshake.bind(self._address("handshake"))
        handshake_address = self.handshake.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.data_parallel:
            from elastic.distributed.group import create_store

            # Port 0: the OS picks a free port, published through the handshake (no race for it).
            self.store = create_store(self.host, 0, is_master=True)
        for engine in self.engines:
            self._spawn(engine, handshake_address)
        await self._handshake(frontend_inputs, frontend_outputs)

    def _spawn(self, engine: EngineProcess, handshake_address: str) -> None:
        # spawn, not fork: torch (CUDA, OpenMP threads) is not fork-safe.
        mp = multiprocessing.get_context("spawn")
        reader, writer = mp.Pipe(duplex=False)
        device = rank_device(self.config.device, engine.index, len(self.engines))
        config = dataclasses.replace(self.config, parallel=self._rank_parallel(engine.index),
                                     model=dataclasses.replace(self.config.model, device=device))
        proc = mp.Process(target=run_engine_core, name=f"EngineCore_{engine.index}",
                          args=(config, engine.index, handshake_address, reader, self.log_level))
        proc.start()
        reader.close()  # only the child keeps the read end: our exit then closes the pipe
        engine.proc, engine.death_writer, engine.pid = proc, writer, proc.pid
        loop = asyncio.get_running_loop()
        engine.exited = loop.create_future()
        loop.add_reader(proc.sentinel, self._on_process_exit, engine)
        logger.info("started engine core %d (pid %d)", engine.index, proc.pid)

    def _rank_parallel(self, rank: int) -> ParallelConfig:
        """The parallel layout one engine joins: in its spawn arguments and again in the handshake (which
        has the last word: a headless engine started elsewhere learns it only there)."""
        parallel = dataclasses.replace(self.config.parallel, data_parallel_size=len(self.engines),
                                       data_parallel_rank=rank)
        if self.store is None:
            return parallel
        return dataclasses.replace(parallel, store_host=self.host, store_port=self.store.port)

    async def _handshake(self, frontend_inputs: list[str], frontend_outputs: list[str]) -> None:
        decoder = msgspec.msgpack.Decoder(EngineHandshakeMessage)
        encoder = msgspec.msgpack.Encoder()
        by_identity = {e.identity: e for e in self.engines}
        coordinator = self.coordinator.addresses if self.coordinator is not None else None
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
                dead = next(e for e in self.engines if e.exit_reason is not None)
                raise EngineStartupError(f"engine core {dead.index} {dead.exit_reason} during start-up")
            identity, payload = recv.result()
            engine = by_identity.get(identity)
            msg = decoder.decode(payload)
            if engine is None or msg.engine_index != engine.index:
                logger.warning("ignoring a handshake message from an unexpected engine: %r", msg)
                continue
            if isinstance(msg, EngineHello):
                engine.pid = msg.pid
                reply = HandshakeAddresses(
                    frontend_inputs[0], frontend_outputs[0], self._rank_parallel(engine.index), stats_interval_s=self.stats_interval_s,
                    coordinator_address=coordinator.input if coordinator else None,
                    coordinator_pub_address=coordinator.engine_pub if coordinator else None,
                    frontend_input_addresses=frontend_inputs if len(frontend_inputs) > 1 else [],
                    frontend_output_addresses=frontend_outputs if len(frontend_outputs) > 1 else [])
                await self.handshake.send_multipart([identity, encoder.encode(reply)])
                logger.info("engine core %d (pid %d) said hello; loading the model", engine.index, msg.pid)
            elif isinstance(msg, EngineReady):
                engine.num_kv_blocks, engine.ready = msg.num_kv_blocks, True
                logger.info("engine core %d ready: %d KV blocks of %d tokens", engine.index, msg.num_kv_blocks,
                            msg.block_size)
            elif isinstance(msg, EngineStartupFailed):
                raise EngineStartupError(f"engine core {engine.index} failed to start: {msg.error}")

    # ---- watching -------------------------------------------------------------------------------------
    def _on_process_exit(self, engine: EngineProcess) -> None:
        assert engine.proc is not None
        asyncio.get_running_loop().remove_reader(engine.proc.sentinel)
        engine.proc.join(timeout=1.0)  # the sentinel fires as the process exits; reap it for its exit code
        engine.exit_reason = describe_exit(engine.proc.exitcode)
        if engine.exited is not None and not engine.exited.done():
            engine.exited.set_result(engine.proc.exitcode)
        if not self.closed:
            self.on_exit(engine.index, engine.exit_reason)

    def _on_coordinator_exit(self) -> None:
        assert self.coordinator is not None
        asyncio.get_running_loop().remove_reader(self.coordinator.sentinel)
        self.coordinator.proc.join(timeout=1.0)
        if not self.closed:
            self.on_exit(-1, f"the DP coordinator {describe_exit(self.coordinator.proc.exitcode)}")

    async def wait_exited(self, timeout: float) -> None:
        exits = [e.exited for e in self.engines if e.exited is not None and not e.exited.done()]
        if exits:
            await asyncio.wait(exits, timeout=timeout)

    def terminate_soon(self, grace_s: float = KILL_GRACE_S) -> None:
        """SIGTERM every engine still alive now and SIGKILL what is left after `grace_s`: a rank blocked in
        a collective with a dead peer only notices at the group timeout (minutes)."""
        alive = [e.proc for e in self.engines if e.proc is not None and e.proc.is_alive()]
        for proc in alive:
            proc.terminate()

        def kill_leftovers() -> None:
            for proc in alive:
                if proc.is_alive():
                    logger.warning("%s did not exit on SIGTERM; killing it", proc.name)
                    proc.kill()

        if alive:
            asyncio.get_running_loop().call_later(grace_s, kill_leftovers)

    # ---- shutdown -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Synchronous, idempotent last resort: no engine or coordinator process outlives it."""
        if self.closed:
            return
        self.closed = True
        procs = [e.proc for e in self.engines if e.proc is not None]
        sentinels = [p.sentinel for p in procs]
        if self.coordinator is not None:
            sentinels.append(self.coordinator.sentinel)
        for fd in sentinels:
            try:
                asyncio.get_running_loop().remove_reader(fd)
            except (RuntimeError, ValueError, OSError):
                pass  # no running loop (atexit) or already removed
        for proc in procs:  # all at once: ranks of one group leave together
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=5.0)
        for proc in procs:
            if proc.is_alive():
                logger.warning("%s did not exit on SIGTERM; killing it", proc.name)
                proc.kill()
                proc.join(timeout=5.0)
        for engine in self.engines:
            if engine.death_writer is not None:
                engine.death_writer.close()
            if engine.exited is not None and not engine.exited.done():
                engine.exited.cancel()
        if self.coordinator is not None:
            self.coordinator.close()
        if self.handshake is not None:
            self.handshake.close(linger=0)
        self.ctx.term()
        self.store = None  # the TCPStore server stops with its last reference
