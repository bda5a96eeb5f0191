"""Front-end side of the engine cores: connect the queues, route requests, move msgspec messages.

The front end binds its input (ROUTER) and output (PULL) sockets and engines connect (ipc:// in a private
temp dir for local engines, tcp:// when an address is configured), so any number of engines can join. A
background task receives output batches and hands them to `on_outputs`; engine death (process sentinel,
an EngineDead message, or a death relayed by the launcher of several API servers) is reported to
`on_engine_dead` at once.

With data parallelism (N engines), requests go to the live engine with the lowest load score
(waiting * 4 + running, as vLLM): the DP coordinator's last LoadSnapshot plus what this front end routed
since. The ranks step in lockstep, so one dead rank stops them all. In a server (`recovers`) the fault
supervisor recovers it and this client re-runs the dead rank's requests elsewhere (`on_engine_lost`);
otherwise (offline `LLM`) every in-flight request fails at once and the remaining ranks are terminated
rather than left hanging in a collective.

Two ways to run: owning the engines (one API server: an EngineLauncher spawns them and the coordinator
here), or attached (one of several API servers: `frontend` names this server's queues, the parent
process launched the engines, and they register on our input socket with their READY).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any, Callable

import msgspec
import zmq
import zmq.asyncio

from elastic.cluster.engine_process import EngineStartupError, describe_exit
from elastic.cluster.launcher import EngineLauncher
from elastic.frontend.node_frontend import start_node_frontend
from elastic.frontend.ipc import make_ipc_namespace, remove_ipc_namespace
from elastic.frontend.load_balancer import LoadBalancer
from elastic.config import EngineConfig
from elastic.protocol.from_coordinator import LoadSnapshot
from elastic.protocol.from_engine import (EngineCoreOutputMessage, EngineCoreOutputs, EngineDead, EngineReady,
                                          SchedulerStats)
from elastic.protocol.scaling import ACTIVE, JOINING, Member, Membership, MembershipUpdate
from elastic.protocol.to_engine import (AbortRequests, EngineCoreInput, EngineCoreRequest, ShutdownEngine, UtilityCall,
                                        engine_identity)
from elastic.transport import security

logger = logging.getLogger(__name__)

__all__ = ["EngineCoreClient", "EngineDeadError", "EngineHandle", "EngineStartupError", "FrontendAddresses",
           "describe_exit"]

_REGISTRATION_TIMEOUT_S = 30.0
_ATTACHED_REGISTRATION_TIMEOUT_S = 900.0  # attached: engines may still be loading weights


class EngineDeadError(RuntimeError):
    """The engine core serving a request is gone."""


class FrontendAddresses(msgspec.Struct, frozen=True):
    """One API server's share of a many-to-many layout: its queues and the coordinator's front-end PUB."""

    client_index: int
    input_address: str
    output_address: str
    coordinator_frontend_pub: str | None = None
    scale_address: str | None = None  # the launcher process's ScaleServer (POST /scale is forwarded there)


@dataclass
class EngineHandle:
    index: int  # the engine id (stable; the ZMQ identity and the metrics label), not its DP rank
    identity: bytes
    rank: int = -1  # DP rank at the current membership epoch (-1: not a member)
    state: str = ACTIVE  # active: routable; joining: not yet; leaving: no new requests (elastic scaling)
    pid: int | None = None
    num_kv_blocks: int = 0
    ready: bool = False
    dead_reason: str | None = None
    stats: SchedulerStats | None = None
    num_in_flight: int = 0  # engine requests routed here by this front end and not finished
    proc: BaseProcess | None = None  # when this front end launched it
    lost: bool = False  # died, and the server recovers: its requests re-run elsewhere (elastic/fault/)


class EngineCoreClient:
    """asyncio client for one front end and `data_parallel_size` engine cores."""

    def __init__(self, config: EngineConfig, *, on_outputs: Callable[[EngineCoreOutputs], None],
                 on_engine_dead: Callable[[int, str], None], address: str | None = None,
                 handshake_port: int = 0, log_level: str = "INFO", stats_interval_s: float = 5.0,
                 frontend: FrontendAddresses | None = None) -> None:
        self.config = config
        self.on_outputs = on_outputs
        self.on_engine_dead = on_engine_dead
        self.address = address  # None: ipc (all engines local)
        self.frontend = frontend
        n = config.parallel.data_parallel_size
        self.membership = Membership(0, [Member(i, i) for i in range(n)])
        self.by_id: dict[int, EngineHandle] = {i: EngineHandle(i, engine_identity(i), rank=i) for i in range(n)}
        self.engines = [self.by_id[i] for i in range(n)]  # the members, in rank order
        self.on_membership: Callable[[Membership, list[int]], None] | None = None  # (record, ids gone)
        self.coordinator_subscribed = False
        # Routing table: [waiting, running] per rank, from the coordinator plus our own routing since.
        self.load_balancer = LoadBalancer(n)
        self.encoder = msgspec.msgpack.Encoder()
        self.output_decoder = msgspec.msgpack.Decoder(EngineCoreOutputMessage)
        self.ctx = zmq.Context()
        self.actx = zmq.asyncio.Context.shadow(self.ctx)
        self.tmpdir: str | None = None
        self.launcher: EngineLauncher | None = None  # created by start() unless attached
        self._launcher_args = dict(address=address, handshake_port=handshake_port, log_level=log_level,
                                   stats_interval_s=stats_interval_s)
        self.input_address = self.output_address = ""
        self.sockets: list[Any] = []
        self.tasks: list[asyncio.Task] = []
        self.utility_calls: dict[int, tuple[int, asyncio.Future]] = {}
        self.call_ids = itertools.count()
        self.lockstep_broken = False
        # Fault recovery (elastic/fault/): whether a dead rank is recovered rather than failing everything;
        # `fault_handler(engine id, reason)` is the supervisor beside our launcher (True: it takes charge);
        # `on_engine_lost(engine id)` re-runs that engine's requests elsewhere.
        self.recovers = False
        self.fault_handler: Callable[[int, str], bool] | None = None
        self.on_engine_lost: Callable[[int], None] | None = None
        self.rejoin: MembershipUpdate | None = None  # attached, replacing an API server that died
        # Beyond one host (docs/deployment.md): a front end on a node other than the head registers its
        # engines there through a NodeAgent; the head's scaling orchestrator handles ranks that join or leave.
        self.node: Any = None  # elastic.cluster.node.NodeAgent
        self.orchestrator_factory: Callable[[], Any] | None = None
        self.started = False
        self._startup_failure: asyncio.Future | None = None  # while waiting for registrations
        self.closing = False
        self.closed = False

    @property
    def handshake_address(self) -> str:
        handshake = self.launcher.handshake if self.launcher is not None else None
        return handshake.getsockopt_string(zmq.LAST_ENDPOINT) if handshake is not None else ""

    # ---- start-up -------------------------------------------------------------------------------------
    def _bind(self) -> None:
        if self.frontend is None and not self.config.parallel.is_head:
            self.tmpdir = make_ipc_namespace()  # a node's own engines are local; the head is the NodeAgent's
        elif self.frontend is None:
            self.tmpdir = make_ipc_namespace() if self.address is None else None
            self.launcher = EngineLauncher(self.config, on_exit=self._on_launcher_exit, socket_dir=self.tmpdir,
                                           **self._launcher_args)  # type: ignore[arg-type]
            self.launcher.remote.get_orchestrator = lambda: self.orchestrator_factory and self.orchestrator_factory()
        if self.frontend is not None:
            input_addr, output_addr = self.frontend.input_address, self.frontend.output_address
        elif self.tmpdir is not None:
            input_addr, output_addr = f"ipc://{self.tmpdir}/input", f"ipc://{self.tmpdir}/output"
        else:
            input_addr = output_addr = f"tcp://{self.address}:0"
        self.input = self.ctx.socket(zmq.ROUTER)
        self.output = self.actx.socket(zmq.PULL)
        self.sockets = [self.input, self.output]
        self.input.setsockopt(zmq.ROUTER_MANDATORY, 1)  # raise on an unknown/vanished engine, never drop
        self.input.setsockopt(zmq.SNDHWM, 0)  # sends never block the event loop
        self.output.setsockopt(zmq.RCVHWM, 0)
        for sock in self.sockets:
            sock.setsockopt(zmq.LINGER, 0)
        security.bind(self.input, input_addr, "front end's input queue")
        security.bind(self.output, output_addr, "front end's output queue")
        # With tcp port 0, the real ports are only known now.
        self.input_address = self.input.getsockopt_string(zmq.LAST_ENDPOINT)
        self.output_address = self.output.getsockopt_string(zmq.LAST_ENDPOINT)

    def _subscribe_coordinator(self, address: str) -> None:
        self.coordinator_subscribed = True
        sub = self.actx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        security.connect(sub, address)
        self.sockets.append(sub)
        self.tasks.append(asyncio.get_running_loop().create_task(self._snapshot_loop(sub), name="dp-load"))

    async def start(self) -> None:
        """Start (or, attached, wait for) the engines until every one is READY; raises EngineStartupError."""
        try:
            self._bind()
            if self.launcher is not None:
                coordinator = await self.launcher.start_coordinator()
                if coordinator is not None:
                    self._subscribe_coordinator(coordinator.frontend_pub)
                await self.launcher.start([self.input_address], [self.output_address])
                for engine in self.engines:
                    proc = self.launcher.engines[engine.index]
                    engine.pid, engine.num_kv_blocks, engine.proc = proc.pid, proc.num_kv_blocks, proc.proc
                await self._await_registrations(_REGISTRATION_TIMEOUT_S)
            elif self.frontend is None:  # this node's ranks, registered with a head elsewhere
                self.node = await start_node_frontend(self)
            else:
                assert self.frontend is not None
                if self.frontend.coordinator_frontend_pub:
                    self._subscribe_coordinator(self.frontend.coordinator_frontend_pub)
                if self.rejoin is not None:
                    await self._rejoin(self.rejoin)
                else:
                    await self._await_registrations(_ATTACHED_REGISTRATION_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self.started = True
        loop = asyncio.get_running_loop()
        if self.rejoin is None:  # a rejoining front end receives already
            self.tasks.append(loop.create_task(self._recv_loop(), name="engine-outputs"))
        self.tasks.append(loop.create_task(self._registration_loop(), name="engine-registrations"))

    async def _await_registrations(self, timeout: float) -> None:
        """Each engine sends its READY on our input socket; until then our ROUTER cannot address it."""
        pending = {e.identity: e for e in self.engines if self.is_local(e.index)}
        inbox = zmq.asyncio.Socket.from_socket(self.input)
        decoder = msgspec.msgpack.Decoder(EngineReady)

        async def receive_all() -> None:
            while pending:
                identity, payload = await inbox.recv_multipart()
                engine = pending.pop(identity, None)
                if engine is None:
                    continue
                engine.ready = True
                try:
                    ready = decoder.decode(payload)
                    engine.num_kv_blocks, engine.pid = ready.num_kv_blocks, ready.pid or engine.pid
                except (msgspec.DecodeError, msgspec.ValidationError):
                    pass  # an engine that registers with an empty frame (older protocol)

        # An engine that dies in between (READY on the handshake, not yet registered here) ends the wait.
        self._startup_failure = asyncio.get_running_loop().create_future()
        receiving = asyncio.ensure_future(receive_all())
        try:
            done, _ = await asyncio.wait([receiving, self._startup_failure], timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            receiving.cancel()
        if self._startup_failure.done():
            raise self._startup_failure.exception() or EngineStartupError("an engine core died during start-up")
        if not done:
            raise EngineStartupError("engine cores said READY but never connected to the input queue")
        self._startup_failure = None

    async def _rejoin(self, update: MembershipUpdate) -> None:
        """A restarted API server (its predecessor died): the engines run already and reconnect to our
        sockets by themselves (same addresses). The membership comes from the parent; an engine counts as
        registered once it answers here."""
        self.apply_membership(update.membership, update.coordinator_frontend_pub)
        self.tasks.append(asyncio.get_running_loop().create_task(self._recv_loop(), name="engine-outputs"))
        deadline = asyncio.get_running_loop().time() + _REGISTRATION_TIMEOUT_S
        for engine in self.engines:
            while not engine.ready:
                try:
                    engine.num_kv_blocks = await self.call_utility(engine.index, "num_kv_blocks", timeout=1.0)
                    engine.ready = True
                except (EngineDeadError, asyncio.TimeoutError):  # not reconnected yet
                    if asyncio.get_running_loop().time() > deadline:
                        raise EngineStartupError(f"engine core {engine.index} did not reconnect") from None
                    await asyncio.sleep(0.05)

    async def _registration_loop(self) -> None:
        """Engines started by a scale-up register later: READY on our input socket, before they are routable."""
        inbox = zmq.asyncio.Socket.from_socket(self.input)
        decoder = msgspec.msgpack.Decoder(EngineReady)
        while True:
            identity, payload = await inbox.recv_multipart()
            try:
                ready = decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            self.register(identity, ready)

    def register(self, identity: bytes, ready: EngineReady) -> None:
        """An engine's READY on our input queue: it can be addressed (routed to once the membership says)."""
        engine = self.by_id.setdefault(ready.engine_index, EngineHandle(ready.engine_index, identity, state=JOINING))
        engine.ready, engine.num_kv_blocks, engine.pid = True, ready.num_kv_blocks, ready.pid

    # ---- membership (elastic scaling) ------------------------------------------------------------------
    def apply_membership(self, membership: Membership, coordinator_frontend_pub: str | None = None) -> None:
        """A new record from the launcher: route only to its active members, by its ranks. Engines that are
        no members any more are forgotten (their last outputs were delivered before they left)."""
        if membership.epoch < self.membership.epoch:
            return  # relayed late
        if coordinator_frontend_pub and not self.coordinator_subscribed:
            self._subscribe_coordinator(coordinator_frontend_pub)
        old_ranks = [e.index for e in self.engines]
        for member in membership.members:
            engine = self.by_id.setdefault(member.engine_id, EngineHandle(member.engine_id,
                                                                           engine_identity(member.engine_id)))
            engine.rank, engine.state = member.rank, member.state
            if self.launcher is not None and member.engine_id in self.launcher.engines:
                engine.proc = self.launcher.engines[member.engine_id].proc
        ids = {m.engine_id for m in membership.members}
        gone = [i for i in self.by_id if i not in ids and (i in old_ranks or self.by_id[i].rank >= 0)]
        for engine_id in gone:
            del self.by_id[engine_id]
        self.engines = [self.by_id[m.engine_id] for m in membership.ranked()]
        if [e.index for e in self.engines] != old_ranks:
            self.load_balancer.reset(len(self.engines))
        self.membership = membership
        if self.on_membership is not None:
            self.on_membership(membership, gone)

    # ---- steady state ---------------------------------------------------------------------------------
    def _on_launcher_exit(self, index: int, reason: str) -> None:
        if self.fault_handler is not None and self.fault_handler(index, reason):
            if index in self.by_id:
                self._mark_dead(self.by_id[index], reason)  # recoverable: its requests re-run elsewhere
            return
        if index < 0:  # the DP coordinator: without it no rank can wake the others
            logger.error("%s; stopping every engine core", reason)
            for engine in self.engines:
                self._mark_dead(engine, f"was stopped: {reason}", root_cause=reason)
            return
        if index in self.by_id:
            self._mark_dead(self.by_id[index], reason)

    def _mark_dead(self, engine: EngineHandle, reason: str, root_cause: str | None = None) -> None:
        if engine.dead_reason is not None:
            return
        engine.dead_reason = reason
        cause = root_cause or f"engine core {engine.index} {reason}"
        for call_id, (index, fut) in list(self.utility_calls.items()):
            if index == engine.index and not fut.done():
                fut.set_exception(EngineDeadError(cause))
                del self.utility_calls[call_id]
        if self.closing:
            logger.info("engine core %d (pid %s) %s", engine.index, engine.pid, reason)
            return
        if engine.ready and self._recoverable(engine):
            engine.lost = True
            logger.error("engine core %d (pid %s) %s; the server recovers, its requests re-run on other ranks",
                         engine.index, engine.pid, reason)
            if self.on_engine_lost is not None:
                self.on_engine_lost(engine.index)
            return
        if not engine.ready:  # still starting: start() reports it (EngineStartupError)
            if self._startup_failure is not None and not self._startup_failure.done():
                self._startup_failure.set_exception(
                    EngineStartupError(f"engine core {engine.index} {reason} during start-up"))
            return
        if root_cause is None:
            logger.error("engine core %d (pid %s) died: it %s; failing its in-flight requests",
                         engine.index, engine.pid, reason)
        self.on_engine_dead(engine.index, cause)
        if len(self.engines) > 1 and not self.lockstep_broken:
            self._break_lockstep(cause)

    def _recoverable(self, engine: EngineHandle) -> bool:
        """The supervisor's rule (elastic/fault/supervisor.py): a rank survives, or a new one is started."""
        if not self.recovers:
            return False
        survivors = [e for e in self.engines if e is not engine and not e.lost and e.dead_reason is None]
        return bool(survivors) or self.config.parallel.restart_failed_ranks

    @property
    def recovering(self) -> bool:
        """A rank died and is being recovered, or a member is not registered here yet."""
        return any(e.lost for e in self.by_id.values()) or any(not e.ready for e in self.engines)

    def _break_lockstep(self, cause: str) -> None:
        """DP ranks step together: without one of them the others can only hang in their next collective."""
        self.lockstep_broken = True
        survivors = [e for e in self.engines if e.dead_reason is None]
        if survivors:
            logger.error("%s: stopping the other %d data-parallel rank(s), whose collectives cannot complete "
                         "without it", cause, len(survivors))
        for other in survivors:
            self._mark_dead(other, f"was stopped: {cause}", root_cause=cause)
        if self.launcher is not None:
            self.launcher.terminate_soon()

    async def _recv_loop(self) -> None:
        while True:
            payload = await self.output.recv(copy=False)
            try:
                msg = self.output_decoder.decode(payload.buffer)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.error("dropping an undecodable engine output: %s", e)
                continue
            if isinstance(msg, MembershipUpdate):  # relayed by the launcher of several API servers
                self.apply_membership(msg.membership, msg.coordinator_frontend_pub)
                continue
            engine = self.by_id.get(msg.engine_index)
            if engine is None:  # an engine that left: it may still hand back requests that reached it late
                if isinstance(msg, EngineCoreOutputs) and msg.migrated:
                    self.on_outputs(EngineCoreOutputs(msg.engine_index, msg.timestamp, migrated=msg.migrated))
                continue
            if isinstance(msg, EngineDead):
                reason = msg.error if msg.relayed else f"crashed: {msg.error}"
                self._mark_dead(engine, reason)
                continue
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

    async def _snapshot_loop(self, sub: Any) -> None:
        decoder = msgspec.msgpack.Decoder(LoadSnapshot)
        while True:
            raw = await sub.recv()
            try:
                snapshot = decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.error("dropping an undecodable load snapshot: %s", e)
                continue
            self.load_balancer.on_snapshot(snapshot, self.membership.epoch)

    @property
    def is_ready(self) -> bool:
        """Started (every engine registered) and not closed. A member added by a scale-up may register a
        moment after the membership names it: it is routed to once it has, and the server stays ready."""
        return self.started and not self.closed and any(e.ready for e in self.engines if self.is_local(e.index))

    def is_local(self, engine_id: int) -> bool:
        """External/hybrid LB: this front end routes to its own node's engines only (docs/deployment.md)."""
        if not self.config.parallel.local_load_balancing:
            return True
        if self.node is not None:
            return engine_id in self.node.spawned
        return self.launcher is None or not self.launcher.remote.is_remote(engine_id)

    @property
    def dead_reason(self) -> str | None:
        reasons = [f"engine core {e.index} {e.dead_reason}" for e in self.engines if e.dead_reason and not e.lost]
        return "; ".join(reasons) or None

    def pick_engine(self, exclude: int | None = None) -> EngineHandle:
        """The live, active engine with the lowest load score; ties go to the lowest rank."""
        live = [e for e in self.engines if e.ready and e.dead_reason is None and e.state == ACTIVE
                and e.index != exclude and self.is_local(e.index)]
        if not live:
            raise EngineDeadError(self.dead_reason or "no engine core is ready")
        return self.load_balancer.pick(live)

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
        self.load_balancer.sent(engine.rank, len(requests))

    def release(self, engine_index: int, num_requests: int) -> None:
        engine = self.by_id.get(engine_index)
        if engine is not None:
            engine.num_in_flight = max(0, engine.num_in_flight - num_requests)

    def abort(self, engine_index: int, request_ids: list[str]) -> None:
        engine = self.by_id.get(engine_index)
        if request_ids and engine is not None and engine.dead_reason is None and not self.closed:
            try:
                self._send(engine, AbortRequests(request_ids))
            except EngineDeadError as e:
                logger.warning("could not abort %d request(s): %s", len(request_ids), e)

    async def call_utility(self, engine_index: int, method: str, *args: Any, timeout: float = 30.0) -> Any:
        call_id = next(self.call_ids)
        fut = asyncio.get_running_loop().create_future()
        self.utility_calls[call_id] = (engine_index, fut)
        try:
            self._send(self.by_id[engine_index], UtilityCall(call_id, method, list(args)))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.utility_calls.pop(call_id, None)

    # ---- shutdown -------------------------------------------------------------------------------------
    async def shutdown(self, timeout: float = 5.0) -> None:
        """Ask every engine to exit, wait a little, then make sure (terminate, kill) and clean up. Attached
        to engines another process launched, only our own sockets close: the launcher stops the engines."""
        if self.closed:
            return
        self.closing = True
        if self.node is not None:  # this node's ranks leave: the head shrinks the group without them
            await self.node.shutdown()
        if self.launcher is not None:
            for engine in self.engines:
                if engine.ready and engine.dead_reason is None:
                    try:
                        self._send(engine, ShutdownEngine())
                    except EngineDeadError:
                        pass
            await self.launcher.wait_exited(timeout)
        self.close()

    def close(self) -> None:
        """Synchronous, idempotent last resort: no engine process, socket or socket file outlives it."""
        if self.closed:
            return
        self.closing = self.closed = True
        for task in self.tasks:
            task.cancel()
        if self.launcher is not None:
            self.launcher.close()
        if self.node is not None:
            self.node.close()
        for fut in [fut for _, fut in self.utility_calls.values()]:
            if not fut.done():
                fut.set_exception(EngineDeadError("the engine client is shut down"))
        self.utility_calls.clear()
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()
        remove_ipc_namespace(self.tmpdir)
