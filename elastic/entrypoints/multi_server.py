"""`elastic serve --api-server-count K`: K API server processes on one port, many-to-many with the engines.

    parent (this module, no HTTP)        EngineLauncher: engines, DP coordinator, TCPStore; watches them all
      ├─ API server 0 … K-1              each binds the HTTP port with SO_REUSEPORT (the kernel spreads
      │    (api_server.serve_http)       connections) and its own input ROUTER / output PULL; every engine
      │                                  connects to every API server and answers each request to the
      │                                  server it came from; every server subscribes to the coordinator
      ├─ engine core 0 … N-1
      └─ DP coordinator (N > 1)

The parent reserves the port (bound with SO_REUSEPORT, never listening), relays engine deaths to every API
server (EngineDead, `relayed`), and owns the shutdown: SIGTERM / SIGINT -> SIGTERM to the API servers
(graceful drain) -> engines and coordinator stopped -> socket files removed. Once the engines run, the fault
supervisor (elastic/fault/) recovers dead ranks and the coordinator, and an API server that dies is started
again in its place (same queues: the engines reconnect; the others keep serving). An engine that fails to
start takes everything down (exit 1), as does an API server that keeps dying.

Metrics add up across the K processes with prometheus-client's multiprocess mode: counters and histograms
are summed over the processes; each engine's gauges are exported once (every server receives the same
engine stats; the most recent write wins), and cumulative engine counters (preemptions) are counted by
API server 0 only.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import msgspec
import zmq

from elastic.cluster.engine_process import EngineStartupError, describe_exit
from elastic.cluster.launcher import EngineLauncher
from elastic.frontend.ipc import make_ipc_namespace, remove_ipc_namespace
from elastic.config import EngineConfig
from elastic.config.server import ServerConfig
from elastic.elastic_ep.orchestrator import ScaleOrchestrator
from elastic.elastic_ep.service import ScaleServer
from elastic.fault.metrics import FaultMetrics
from elastic.fault.supervisor import FaultSupervisor
from elastic.frontend.engine_client import FrontendAddresses
from elastic.metrics import ServerMetrics
from elastic.parent_watch import watch_parent
from elastic.protocol.from_engine import EngineDead
from elastic.protocol.scaling import MembershipUpdate

logger = logging.getLogger(__name__)

_API_SERVER_EXIT_MARGIN_S = 10.0  # on top of --shutdown-timeout
# After a scale-down, a leaving rank hands back what API servers sent it before the new membership reached
# them (relayed: milliseconds), then exits.
_LEAVE_GRACE_S = 0.5
_MAX_API_SERVER_RESTARTS = 20  # an API server that keeps dying (a bug at start-up) ends the server


def reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# ---- metrics ------------------------------------------------------------------------------------------
# ---- one API server process ---------------------------------------------------------------------------
def run_api_server_worker(config: EngineConfig, args: ServerConfig, frontend: FrontendAddresses, port: int,
                          death_pipe: Connection, rejoin: MembershipUpdate | None = None) -> None:
    from elastic.entrypoints.api_server import serve_http
    from elastic.frontend.async_llm import AsyncLLM
    from elastic.logger import setup_logging

    setup_logging(args.log_level)
    launcher_pid = os.getppid()
    watch_parent(death_pipe, "API server")
    metrics = ServerMetrics(config.model.served_model_name, config.model.max_model_len, multiprocess=True,
                            primary=frontend.client_index == 0)
    engine = AsyncLLM(config, metrics=metrics, log_level=args.log_level.upper(), frontend=frontend)
    engine.client.rejoin = rejoin  # a restarted API server: the engines run already
    try:
        code = serve_http(engine, metrics, args, reuseport_socket(args.host, port))
    finally:
        if os.getppid() != launcher_pid:  # the launcher was killed outright: its metrics dir is ours to remove
            shutil.rmtree(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or "/nonexistent", ignore_errors=True)
    raise SystemExit(code)


# ---- the parent -------------------------------------------------------------------------------------------
def run_multi_server(config: EngineConfig, args: ServerConfig) -> int:
    if config.parallel.data_parallel_address is not None:
        logger.error("--api-server-count > 1 runs every engine on this host (ipc); it cannot be combined with "
                     "--data-parallel-address yet")
        return 1
    try:
        reserved = reuseport_socket(args.host, args.port)  # bound, never listening: holds the port for us
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
    multiprocessing.current_process().name = "Launcher"  # in the log lines of this process
    socket_dir = make_ipc_namespace()  # abstract sockets on Linux: nothing on disk, even after a SIGKILL
    metrics_dir = tempfile.mkdtemp(prefix="elastic-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the API server processes
    try:
        return asyncio.run(_Parent(config, args, reserved.getsockname()[1], socket_dir).run())
    finally:
        reserved.close()
        remove_ipc_namespace(socket_dir)
        shutil.rmtree(metrics_dir, ignore_errors=True)


class _Parent:
    def __init__(self, config: EngineConfig, args: ServerConfig, port: int, socket_dir: str) -> None:
        self.config, self.args, self.port, self.socket_dir = config, args, port, socket_dir
        self.count = args.api_server_count
        self.frontends: list[FrontendAddresses] = []
        self.servers: list[BaseProcess] = []
        self.death_writers: list[Connection] = []
        self.stop = asyncio.Event()
        self.stopping = False
        self.lockstep_broken = False
        self.exit_code = 0
        self.ctx = zmq.Context()
        self.relays: list[zmq.Socket] = []
        self.launcher = EngineLauncher(config, on_exit=self._on_engine_exit, socket_dir=socket_dir,
                                       log_level=args.log_level.upper())
        # Elastic scaling runs here, beside the launcher; API servers forward POST /scale to it.
        self.orchestrator = ScaleOrchestrator(self.launcher, config, self._relay_membership,
                                              leave_grace_s=_LEAVE_GRACE_S)
        self.scale_server: ScaleServer | None = None
        self.supervisor: FaultSupervisor | None = None  # once the engines run
        self.restarts = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._request_stop, 0)
        try:
            coordinator = await self.launcher.start_coordinator()
            self.scale_server = ScaleServer(self.launcher.ctx, f"ipc://{self.socket_dir}/scale", self.orchestrator)
            self.frontends = [FrontendAddresses(k, f"ipc://{self.socket_dir}/input-{k}",
                                                f"ipc://{self.socket_dir}/output-{k}",
                                                coordinator.frontend_pub if coordinator else None,
                                                scale_address=self.scale_server.address)
                              for k in range(self.count)]
            for frontend in self.frontends:
                self._spawn_api_server(frontend)
            logger.info("listening on %s:%d with %d API servers; starting the engines", self.args.host, self.port,
                        self.count)
            starting = asyncio.ensure_future(self.launcher.start([f.input_address for f in self.frontends],
                                                                 [f.output_address for f in self.frontends]))
            stopped = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # raises EngineStartupError
                logger.info("all %d engine core(s) ready", len(self.launcher.member_ids()))
                self.scale_server.ready = True
                self.supervisor = FaultSupervisor(self.launcher, self.orchestrator, self.config,
                                                  FaultMetrics.in_parent(self.config.model.served_model_name))
                await stopped
            else:
                starting.cancel()
        except EngineStartupError as e:
            logger.error("%s", e)
            self.exit_code = 1
        finally:
            await self._shutdown()
        return self.exit_code

    def _spawn_api_server(self, frontend: FrontendAddresses, rejoin: MembershipUpdate | None = None) -> None:
        mp = multiprocessing.get_context("spawn")
        reader, writer = mp.Pipe(duplex=False)
        proc = mp.Process(target=run_api_server_worker, name=f"APIServer_{frontend.client_index}",
                          args=(self.config, self.args, frontend, self.port, reader, rejoin))
        proc.start()
        reader.close()
        asyncio.get_running_loop().add_reader(proc.sentinel, self._on_api_server_exit, proc)
        k = frontend.client_index
        if rejoin is not None:  # in its predecessor's place; the relay to its output queue stays
            self.servers[k], self.death_writers[k] = proc, writer
            return
        self.servers.append(proc)
        self.death_writers.append(writer)
        relay = self.ctx.socket(zmq.PUSH)
        relay.setsockopt(zmq.LINGER, 0)
        relay.setsockopt(zmq.SNDHWM, 0)
        relay.connect(frontend.output_address)
        self.relays.append(relay)

    def _request_stop(self, code: int) -> None:
        if not self.stop.is_set():
            self.exit_code = max(self.exit_code, code)
            self.stop.set()

    def _on_api_server_exit(self, proc: BaseProcess) -> None:
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        proc.join(1.0)
        if self.stopping:
            return
        if self.supervisor is None or self.restarts >= _MAX_API_SERVER_RESTARTS:
            logger.error("%s (pid %s) %s; shutting down", proc.name, proc.pid, describe_exit(proc.exitcode))
            self._request_stop(1)
            return
        # The others keep serving; a new one takes its queues (the engines reconnect) and its share of the port.
        self.restarts += 1
        k = self.servers.index(proc)
        logger.error("%s (pid %s) %s; restarting it (restart %d)", proc.name, proc.pid,
                     describe_exit(proc.exitcode), self.restarts)
        self.death_writers[k].close()
        coordinator = self.launcher.coordinator
        pub = coordinator.addresses.frontend_pub if coordinator is not None and coordinator.addresses else None
        self._spawn_api_server(self.frontends[k], MembershipUpdate(self.launcher.membership, pub))

    def _on_engine_exit(self, index: int, reason: str) -> None:
        """Tell every API server (it fails the requests and, with DP, stops routing to every rank)."""
        if self.stopping:
            return
        if self.supervisor is not None and self.supervisor.rank_failed(index, reason):
            if index >= 0:  # every API server re-runs its requests of that rank elsewhere
                payload = msgspec.msgpack.encode(EngineDead(index, reason, relayed=True))
                for relay in self.relays:
                    relay.send(payload, zmq.NOBLOCK)
            return
        if self.lockstep_broken:  # a rank we stopped ourselves; every API server knows already
            logger.info("engine core %d %s", index, reason)
            return
        engines = self.launcher.member_ids() if index < 0 else [index]
        encoder = msgspec.msgpack.Encoder()
        for i in engines:
            error = f"was stopped: {reason}" if index < 0 else reason
            for relay in self.relays:
                relay.send(encoder.encode(EngineDead(i, error, relayed=True)), zmq.NOBLOCK)
        logger.error("%s%s; failing its requests in every API server", f"engine core {index} " if index >= 0 else "",
                     reason)
        if self.scale_server is not None:
            self.scale_server.ready = False  # nothing left to scale
        if self.launcher.data_parallel:  # the ranks step together: the others cannot go on
            self.lockstep_broken = True
            self.launcher.terminate_soon()

    def _relay_membership(self, update: MembershipUpdate) -> None:
        """A new membership record (elastic scaling) to every API server, on its output queue."""
        payload = msgspec.msgpack.encode(update)
        for relay in self.relays:
            relay.send(payload, zmq.NOBLOCK)

    async def _shutdown(self) -> None:
        self.stopping = True
        if self.supervisor is not None:
            self.supervisor.close()
        if self.scale_server is not None:
            self.scale_server.close()
        alive = [p for p in self.servers if p.is_alive()]
        for proc in alive:
            proc.terminate()  # uvicorn: stop accepting, drain for --shutdown-timeout, abort the rest
        deadline = self.args.shutdown_timeout + _API_SERVER_EXIT_MARGIN_S
        await asyncio.get_running_loop().run_in_executor(None, _join_all, alive, deadline)
        for proc in alive:
            if proc.is_alive():
                logger.warning("%s did not exit; killing it", proc.name)
                proc.kill()
                proc.join(5.0)
        for writer in self.death_writers:
            writer.close()
        self.launcher.close()
        for relay in self.relays:
            relay.close(linger=0)
        self.ctx.term()


def _join_all(procs: list[BaseProcess], timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
