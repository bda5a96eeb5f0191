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
from typing import Any, Callable

import msgspec
import zmq
import zmq.asyncio

from elastic.cluster.coordinator import CoordinatorAddresses, CoordinatorProcess
from elastic.cluster.devices import pick_device
from elastic.cluster.engine_process import EngineProcess, EngineStartupError, describe_exit
from elastic.cluster.placement import remote_ranks
from elastic.cluster.standby import StandbyPool
from elastic.config import EngineConfig, ParallelConfig
from elastic.engine.process import run_engine_core
from elastic.protocol.fault import RankFault
from elastic.protocol.from_engine import EngineHandshakeMessage, EngineHello, EngineReady, EngineStartupFailed
from elastic.protocol.scaling import JoinInfo, Member, Membership, ScaleCommitted
from elastic.protocol.to_coordinator import ScaleElasticEP
from elastic.protocol.to_engine import HandshakeAddresses, engine_identity
from elastic.transport import security

logger = logging.getLogger(__name__)

KILL_GRACE_S = 2.0  # after SIGTERM, before SIGKILL, when the lockstep of DP ranks is broken anyway


class EngineLauncher:
    """`on_exit(index, reason)`: a member engine process exited unexpectedly (index -1: the DP coordinator
    did). The engines and their `membership` (epoch, engine ids and ranks) change with elastic scaling:
    elastic_ep/ drives that through `spawn_joining`, `control`, `retire` and `set_membership`."""

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
        # Every engine process alive or starting, by engine id (ids are never reused).
        self.engines: dict[int, EngineProcess] = {i: EngineProcess(i, engine_identity(i)) for i in range(n)}
        self.next_engine_id = n
        self.membership = Membership(0, [Member(i, i) for i in range(n)])
        self.host = address or "127.0.0.1"
        self.ctx = zmq.asyncio.Context()
        self.handshake: Any = None
        self.handshake_address = ""
        self.frontend_inputs: list[str] = []
        self.frontend_outputs: list[str] = []
        self.store: Any = None  # torch TCPStore master (DP > 1, or since the first scale-up)
        self.coordinator: CoordinatorProcess | None = None
        self.coordinator_push: Any = None  # SCALE_ELASTIC_EP
        self.control_task: asyncio.Task | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self.closed = False
        # Fault recovery (elastic/fault/): an engine whose step's collective failed says so here.
        self.on_fault: Callable[[RankFault], None] | None = None
        self.remote = remote_ranks(self)  # ranks on other machines: nodes or Ray (docs/deployment.md)
        self.standby = StandbyPool(self)

    @property
    def data_parallel(self) -> bool:
        return self.membership.world_size > 1

    def member_ids(self) -> list[int]:
        return [m.engine_id for m in self.membership.ranked()]

    def _address(self, name: str) -> str:
        return f"ipc://{self.socket_dir}/{name}" if self.socket_dir else f"tcp://{self.host}:0"

    # ---- start-up -------------------------------------------------------------------------------------
    async def start_coordinator(self) -> CoordinatorAddresses | None:
        """With DP > 1: start the coordinator and return its bound addresses (front ends subscribe first)."""
        if not self.data_parallel:
            return None
        return await self.ensure_coordinator()

    async def ensure_coordinator(self, names: CoordinatorAddresses | None = None) -> CoordinatorAddresses:
        """The coordinator's addresses, starting it first if need be (a 1 -> N scale; `names`: bind these)."""
        if self.coordinator is not None:
            assert self.coordinator.addresses is not None
            return self.coordinator.addresses
        names = names or CoordinatorAddresses(*(self._address(n) for n in ("coord-in", "coord-engines",
                                                                           "coord-frontends")))
        self.coordinator = CoordinatorProcess(names, self.membership.world_size, self.log_level)
        loop = asyncio.get_running_loop()
        addresses = await loop.run_in_executor(None, self.coordinator.wait_addresses)
        loop.add_reader(self.coordinator.sentinel, self._on_coordinator_exit)
        self.coordinator_push = self.ctx.socket(zmq.PUSH)
        self.coordinator_push.setsockopt(zmq.LINGER, 0)
        security.connect(self.coordinator_push, addresses.input)
        logger.info("started the DP coordinator (pid %d)", self.coordinator.pid)
        return addresses

    async def restart_coordinator(self) -> CoordinatorAddresses:
        """A new DP coordinator on the dead one's addresses (engines and front ends reconnect by themselves);
        its table and waves refill from the engines' reports, its size and epoch from the membership."""
        old = self.coordinator
        self.coordinator = None
        if self.coordinator_push is not None:
            self.coordinator_push.close(linger=0)
        if old is not None:
            old.close()
        addresses = await self.ensure_coordinator(old.addresses if old is not None else None)
        await self.notify_coordinator(ScaleElasticEP(self.membership.world_size, self.membership.epoch))
        return addresses

    def ensure_store(self) -> tuple[str, int]:
        """The TCPStore of the ranks' stateless groups, started on first need (port 0: no port race)."""
        if self.store is None:
            from elastic.distributed.group import create_store

            self.store = create_store(self.host, 0, is_master=True)
        return self.host, self.store.port

    async def start(self, frontend_inputs: list[str], frontend_outputs: list[str]) -> None:
        """Spawn every engine and wait until each is READY; raises EngineStartupError otherwise."""
        self.handshake = self.ctx.socket(zmq.ROUTER)
        self.handshake.setsockopt(zmq.LINGER, 0)
        if self.socket_dir is None and self.handshake_port:
            handshake_address = security.bind(self.handshake, f"tcp://{self.host}:{self.handshake_port}", "handshake")
        else:
            handshake_address = security.bind(self.handshake, self._address("handshake"), "handshake")
        self.handshake_address = handshake_address
        self.frontend_inputs, self.frontend_outputs = list(frontend_inputs), list(frontend_outputs)
        if self.data_parallel:
            self.ensure_store()  # published through the handshake
        self.remote.start()
        for engine in self.engines.values():
            if self.remote.is_local(engine.index):
                self._spawn(engine, handshake_address, self._rank_parallel(engine.index))
            else:
                self.remote.expect(engine)  # a node offers it (docs/deployment.md)
        await self._handshake(frontend_inputs, frontend_outputs)
        # From now on the handshake socket is the control channel (and greets engines a scale starts).
        self.control_task = asyncio.get_running_loop().create_task(self._control_loop(), name="engine-control")
        self.standby.refill()

    def _spawn(self, engine: EngineProcess, handshake_address: str, parallel: ParallelConfig,
               device: str | None = None) -> None:
        # spawn, not fork: torch (CUDA, OpenMP threads) is not fork-safe.
        mp = multiprocessing.get_context("spawn")
        reader, writer = mp.Pipe(duplex=False)
        taken = {e.device for e in self.engines.values()
                 if e.device is not None and e.exited is not None and not e.exited.done()}
        device = engine.device = device or pick_device(self.config.device, parallel.data_parallel_rank,
                                                       parallel.data_parallel_size, taken)
        config = dataclasses.replace(self.config, parallel=parallel,
                                     model=dataclasses.replace(self.config.model, device=device))
        proc = mp.Process(target=run_engine_core, name=f"EngineCore_{engine.index}",
                          args=(config, engine.index, handshake_address, reader, self.log_level),
                          kwargs={"standby": engine.standby is not None})
        proc.start()
        reader.close()  # only the child keeps the read end: our exit then closes the pipe
        engine.proc, engine.death_writer, engine.pid = proc, writer, proc.pid
        loop = asyncio.get_running_loop()
        engine.exited = loop.create_future()
        loop.add_reader(proc.sentinel, self._on_process_exit, engine)
        logger.info("started engine core %d (pid %d)", engine.index, proc.pid)

    def _rank_parallel(self, rank: int, world: int | None = None) -> ParallelConfig:
        """The parallel layout one engine joins: in its spawn arguments and again in the handshake (which
        has the last word: a headless engine started elsewhere learns it only there)."""
        world = self.membership.world_size if world is None else world
        parallel = dataclasses.replace(self.config.parallel, data_parallel_size=world, data_parallel_rank=rank)
        if self.store is None:
            return parallel
        return dataclasses.replace(parallel, store_host=self.host, store_port=self.store.port)

    async def _handshake(self, frontend_inputs: list[str], frontend_outputs: list[str]) -> None:
        decoder = msgspec.msgpack.Decoder(EngineHandshakeMessage)
        encoder = msgspec.msgpack.Encoder()
        by_identity = {e.identity: e for e in self.engines.values()}
        while not all(e.ready for e in self.engines.values()):
            recv = asyncio.ensure_future(self.handshake.recv_multipart())
            exits = [e.exited for e in self.engines.values() if e.exited is not None]
            try:
                await asyncio.wait([recv, *exits], return_when=asyncio.FIRST_COMPLETED)
                if not recv.done():  # an engine exited: its last words (why) may still be on the way
                    await asyncio.wait([recv], timeout=0.5)
            finally:
                if not recv.done():
                    recv.cancel()
            if recv.cancelled():
                dead = next(e for e in self.engines.values() if e.exit_reason is not None)
                raise EngineStartupError(f"engine core {dead.index} {dead.exit_reason} during start-up")
            identity, payload = recv.result()
            if self.remote.handles(identity):
                self.remote.handle(identity, payload)
                continue
            engine = by_identity.get(identity)
            try:
                msg = decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.error("dropping an undecodable handshake message: %s", e)
                continue
            if engine is None or msg.engine_index != engine.index:
                logger.warning("ignoring a handshake message from an unexpected engine: %r", msg)
                continue
            if isinstance(msg, EngineHello):
                engine.pid = msg.pid
                reply = self._hello_reply(self._rank_parallel(engine.index), self.membership.epoch,
                                          engine_id=engine.index)
                await self.handshake.send_multipart([identity, encoder.encode(reply)])
                logger.info("engine core %d (pid %d) said hello; loading the model", engine.index, msg.pid)
            elif isinstance(msg, EngineReady):
                engine.num_kv_blocks, engine.ready = msg.num_kv_blocks, True
                engine.free_memory_bytes = msg.free_memory_bytes
                engine.expert_slot_capacity = msg.expert_slot_capacity
                logger.info("engine core %d ready: %d KV blocks of %d tokens", engine.index, msg.num_kv_blocks,
                            msg.block_size)
            elif isinstance(msg, EngineStartupFailed):
                raise EngineStartupError(f"engine core {engine.index} failed to start: {msg.error}")

    def _hello_reply(self, parallel: ParallelConfig, epoch: int, join: JoinInfo | None = None,
                     engine_id: int | None = None) -> HandshakeAddresses:
        coordinator = self.coordinator.addresses if self.coordinator is not None else None
        # An engine of a node with its own API server (external/hybrid LB) serves that one.
        inputs, outputs = self.remote.frontend_queues(engine_id) or (self.frontend_inputs, self.frontend_outputs)
        return HandshakeAddresses(
            inputs[0], outputs[0], parallel, stats_interval_s=self.stats_interval_s,
            coordinator_address=coordinator.input if coordinator else None,
            coordinator_pub_address=coordinator.engine_pub if coordinator else None,
            frontend_input_addresses=inputs if len(inputs) > 1 else [],
            frontend_output_addresses=outputs if len(outputs) > 1 else [], join=join, epoch=epoch)

    # ---- elastic scaling: the moves elastic_ep/ makes -------------------------------------------------------
    def spawn_joining(self, rank: int, layout_world: int, epoch: int, join: JoinInfo) -> EngineProcess:
        """Start an engine for rank `rank` of a `layout_world`-rank layout; it is no member until the
        scale commits (its exit is the scale's business, not a serving failure). Await its `ready_fut`."""
        parallel = self._rank_parallel(rank, layout_world)
        standby = self.standby.claim(rank, layout_world) if join is not None and not self.remote.offers(rank) \
            else None
        if standby is not None:
            return self._answer_standby(standby, parallel, epoch, join)
        engine_id = self.next_engine_id
        self.next_engine_id += 1
        engine = EngineProcess(engine_id, engine_identity(engine_id))
        engine.ready_fut = asyncio.get_running_loop().create_future()
        self.engines[engine_id] = engine
        if not self.remote.start_engine(engine, parallel):  # a node offered this rank: it starts it there
            self._spawn(engine, self.handshake_address, parallel)
        engine.hello_reply = self._hello_reply(parallel, epoch, join, engine_id=engine_id)
        return engine

    def spawn_standby(self, device: str, rank: int, layout_world: int) -> EngineProcess:
        """Start a standby engine on `device`, prewarming for rank `rank` of `layout_world` (cluster/standby.py)."""
        engine_id = self.next_engine_id
        self.next_engine_id += 1
        engine = EngineProcess(engine_id, engine_identity(engine_id), standby=(layout_world, rank))
        self.engines[engine_id] = engine
        self._spawn(engine, self.handshake_address, self._rank_parallel(rank, layout_world), device=device)
        logger.info("engine core %d: standby on %s, prewarming for rank %d of %d", engine_id, device, rank,
                    layout_world)
        return engine

    def _answer_standby(self, engine: EngineProcess, parallel: ParallelConfig, epoch: int,
                        join: JoinInfo) -> EngineProcess:
        engine.ready_fut = asyncio.get_running_loop().create_future()
        engine.hello_reply = self._hello_reply(parallel, epoch, join, engine_id=engine.index)
        if engine.hello_seen:  # it waits in its handshake already
            self.handshake.send_multipart([engine.identity, self._encoder.encode(engine.hello_reply)])
        return engine

    def control(self, engine_id: int, msg: Any, reply: type | None = None) -> asyncio.Future | None:
        """Send a control message; with `reply`, a future for the engine's answer of that type (it fails if
        the engine exits first)."""
        engine = self.engines[engine_id]
        fut = None
        if reply is not None:
            fut = asyncio.get_running_loop().create_future()
            engine.waiters[(reply, msg.op)] = fut
            if engine.exit_reason is not None:
                fut.set_exception(RuntimeError(f"engine core {engine_id} {engine.exit_reason}"))
                return fut
        self.handshake.send_multipart([engine.identity, self._encoder.encode(msg)])
        return fut

    def stop_engine(self, engine: EngineProcess, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL) one engine, here or through the node that runs it."""
        if engine.proc is not None:
            if engine.proc.is_alive():
                engine.proc.kill() if kill else engine.proc.terminate()
        elif engine.exit_reason is None:
            self.remote.terminate(engine.index, kill)

    def retire(self, engine_id: int) -> None:
        """Its exit is expected from now on (it left, or it was started for a scale that is rolled back)."""
        self.engines[engine_id].retiring = True

    def forget(self, engine_id: int) -> None:
        """Drop an engine whose process has exited (after retire)."""
        engine = self.engines.pop(engine_id, None)
        if engine is not None and engine.death_writer is not None:
            engine.death_writer.close()

    def set_membership(self, membership: Membership) -> None:
        self.membership = membership

    async def notify_coordinator(self, msg: ScaleElasticEP) -> None:
        if self.coordinator_push is not None:
            await self.coordinator_push.send(self._encoder.encode(msg))

    async def _control_loop(self) -> None:
        """After start-up: answer the HELLO of engines a scale starts, and route their READY (or failure)
        and every engine's ScalePrepared / ScaleCommitted to whoever waits for it."""
        decoder = msgspec.msgpack.Decoder(EngineHandshakeMessage)
        while True:
            identity, payload = await self.handshake.recv_multipart()
            if self.remote.handles(identity):
                self.remote.handle(identity, payload)
                continue
            engine = next((e for e in self.engines.values() if e.identity == identity), None)
            try:
                msg = decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.error("dropping an undecodable control message: %s", e)
                continue
            if engine is None:
                logger.warning("ignoring a control message from an unknown engine: %r", msg)
            elif isinstance(msg, EngineHello):
                engine.pid, engine.hello_seen = msg.pid, True
                if engine.hello_reply is not None:
                    await self.handshake.send_multipart([identity, self._encoder.encode(engine.hello_reply)])
                    logger.info("engine core %d (pid %d) said hello; joining", engine.index, msg.pid)
                elif engine.standby is not None:
                    logger.info("engine core %d (pid %d): standby, prewarmed", engine.index, msg.pid)
            elif isinstance(msg, (EngineReady, EngineStartupFailed)):
                engine.ready = isinstance(msg, EngineReady)
                engine.num_kv_blocks = msg.num_kv_blocks if isinstance(msg, EngineReady) else 0
                engine.free_memory_bytes = msg.free_memory_bytes if isinstance(msg, EngineReady) else None
                engine.expert_slot_capacity = msg.expert_slot_capacity if isinstance(msg, EngineReady) else None
                if engine.ready_fut is not None and not engine.ready_fut.done():
                    if engine.ready:
                        engine.ready_fut.set_result(msg)
                    else:
                        engine.ready_fut.set_exception(EngineStartupError(
                            f"engine core {engine.index} failed to start: {msg.error}"))  # type: ignore[union-attr]
            elif isinstance(msg, RankFault):
                if self.on_fault is not None:
                    self.on_fault(msg)
            else:
                if isinstance(msg, ScaleCommitted) and msg.free_memory_bytes is not None:
                    engine.free_memory_bytes = msg.free_memory_bytes  # its slots per rank just changed
                    engine.expert_slot_capacity = msg.expert_slot_capacity
                fut = engine.waiters.pop((type(msg), msg.op), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    def fail_waiters(self, engine_id: int, reason: str) -> None:
        """Whoever awaits this engine's answer stops waiting (fault recovery: its step's collective failed,
        so a scale it was committing will not hear from it)."""
        if engine_id in self.engines:
            self._fail_waiters(self.engines[engine_id], reason)

    def _fail_waiters(self, engine: EngineProcess, reason: str) -> None:
        for fut in engine.waiters.values():
            if not fut.done():
                fut.set_exception(RuntimeError(reason))
        engine.waiters.clear()
        if engine.ready_fut is not None and not engine.ready_fut.done():
            engine.ready_fut.set_exception(EngineStartupError(reason))

    # ---- watching -------------------------------------------------------------------------------------
    def _on_process_exit(self, engine: EngineProcess) -> None:
        assert engine.proc is not None
        asyncio.get_running_loop().remove_reader(engine.proc.sentinel)
        engine.proc.join(timeout=1.0)  # the sentinel fires as the process exits; reap it for its exit code
        self.engine_exited(engine, describe_exit(engine.proc.exitcode))

    def engine_exited(self, engine: EngineProcess, reason: str) -> None:
        """An engine process ended (here: its sentinel; on another node: that node's report)."""
        engine.exit_reason = reason
        if engine.exited is not None and not engine.exited.done():
            engine.exited.set_result(engine.proc.exitcode if engine.proc is not None else None)
        self._fail_waiters(engine, f"engine core {engine.index} {engine.exit_reason}")
        # A rank that left or a rank a scale started: elastic_ep/ handles it, serving goes on.
        if not self.closed and not engine.retiring and engine.index in self.member_ids():
            self.on_exit(engine.index, engine.exit_reason)
        elif not self.closed and engine.standby is not None:  # no member: the pool replaces it
            if not engine.retiring:
                logger.warning("standby engine core %d %s", engine.index, engine.exit_reason)
            self.standby.standby_exited(engine)

    def _on_coordinator_exit(self) -> None:
        assert self.coordinator is not None
        asyncio.get_running_loop().remove_reader(self.coordinator.sentinel)
        self.coordinator.proc.join(timeout=1.0)
        if not self.closed:
            self.on_exit(-1, f"the DP coordinator {describe_exit(self.coordinator.proc.exitcode)}")

    async def wait_exited(self, timeout: float) -> None:
        exits = [e.exited for e in self.engines.values() if e.exited is not None and not e.exited.done()]
        if exits:
            await asyncio.wait(exits, timeout=timeout)

    def terminate_soon(self, grace_s: float = KILL_GRACE_S) -> None:
        """SIGTERM every engine still alive now and SIGKILL what is left after `grace_s`: a rank blocked in
        a collective with a dead peer only notices at the group timeout (minutes)."""
        alive = [e.proc for e in self.engines.values() if e.proc is not None and e.proc.is_alive()]
        for proc in alive:
            proc.terminate()
        for engine_id in self.engines:
            self.remote.terminate(engine_id)  # engines on other nodes: their node stops them

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
        self.remote.close()  # nodes stop their engines
        self.closed = True
        if self.control_task is not None:
            self.control_task.cancel()
        procs = [e.proc for e in self.engines.values() if e.proc is not None]
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
        for engine in self.engines.values():
            self._fail_waiters(engine, "the launcher is closed")
            if engine.death_writer is not None:
                engine.death_writer.close()
            if engine.exited is not None and not engine.exited.done():
                engine.exited.cancel()
        if self.coordinator is not None:
            self.coordinator.close()
        if self.handshake is not None:
            self.handshake.close(linger=0)
        if self.coordinator_push is not None:
            self.coordinator_push.close(linger=0)
        self.ctx.term()
        if hasattr(self.store, "close"):
            self.store.close()  # the authenticated store's thread (transport/store.py)
        self.store = None  # a TCPStore server stops with its last reference
