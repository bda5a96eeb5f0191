"""The DP coordinator process (runs when data_parallel_size > 1).

It keeps each engine's waiting/running counts and publishes them to every API server (at most every
100 ms while they change, and every few seconds regardless, as a heartbeat), tracks the request wave
(running or paused), wakes paused engines with START_DP_WAVE when one of them gets a request, and resizes
its engine table on SCALE_ELASTIC_EP.

Sockets (all bound here):
  input         PULL  <- engines' EngineLoad / WaveComplete / StartWaveRequest, front ends' ScaleElasticEP
  engine_pub    XPUB  -> engines: StartDPWave (CoordinatorHello to each new subscriber)
  frontend_pub  XPUB  -> API servers: LoadSnapshot (one at once to each new subscriber)
XPUB, not PUB: it tells us when a subscriber joins, so a new engine can be told its subscription is live
(anything published before that is silently lost) and a new front end gets the table without waiting.

Nothing spins: the loop blocks in one poll (sockets and the parent's death pipe) until a message arrives
or the next snapshot is due.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec
import zmq

from elastic.protocol.from_coordinator import CoordinatorHello, LoadSnapshot, StartDPWave
from elastic.protocol.to_coordinator import CoordinatorInput, EngineLoad, ScaleElasticEP, StartWaveRequest, WaveComplete
from elastic.transport import security

logger = logging.getLogger(__name__)

PUBLISH_MIN_INTERVAL_S = 0.1
HEARTBEAT_INTERVAL_S = 2.0
_START_TIMEOUT_S = 60.0


class CoordinatorAddresses(msgspec.Struct, frozen=True):
    input: str
    engine_pub: str
    frontend_pub: str


class Coordinator:
    """State and message handling, separate from the sockets so the logic reads (and tests) plainly.

    Waves: `wave` is the number of the current (or next) wave; `running` whether it is under way. A
    StartWaveRequest for an older wave is stale (that wave already completed, and with it the request
    that asked for it), so nothing is broadcast. A WaveComplete for an older wave than the current one
    means a newer wave started meanwhile (its request overtook the completion): it must not pause it.
    """

    def __init__(self, num_engines: int) -> None:
        self.counts: list[list[int]] = [[0, 0] for _ in range(num_engines)]  # [waiting, running] by DP rank
        self.epoch = 0  # membership epoch of the table (SCALE_ELASTIC_EP)
        self.wave = 0
        self.running = False
        self.changed = True

    def handle(self, msg: CoordinatorInput) -> StartDPWave | None:
        """Apply one message; returns a wave start to broadcast to the engines, if any."""
        if isinstance(msg, EngineLoad):
            if 0 <= msg.engine_index < len(self.counts):
                new = [msg.num_waiting, msg.num_running]
                if self.counts[msg.engine_index] != new:
                    self.counts[msg.engine_index] = new
                    self.changed = True
        elif isinstance(msg, WaveComplete):
            if msg.wave >= self.wave:
                self.wave, self.running, self.changed = msg.wave + 1, False, True
        elif isinstance(msg, StartWaveRequest):
            if msg.wave >= self.wave:
                self.wave, self.running, self.changed = msg.wave, True, True
                return StartDPWave(msg.wave, msg.exclude_engine)
        elif isinstance(msg, ScaleElasticEP):
            n = msg.new_engine_count
            if n < 1:
                logger.warning("ignoring SCALE_ELASTIC_EP to %d engines", n)
                return None
            self.counts = (self.counts + [[0, 0] for _ in range(n)])[:n]
            self.epoch = max(self.epoch, msg.epoch)
            self.changed = True
            logger.info("engine table resized to %d engines (epoch %d)", n, self.epoch)
        return None

    def snapshot(self) -> LoadSnapshot:
        self.changed = False
        return LoadSnapshot([list(c) for c in self.counts], self.wave, self.running, self.epoch)

    def next_publish_in(self, now: float, last_publish: float) -> float:
        """Seconds until a snapshot is due: soon after a change (rate-limited), else the heartbeat."""
        interval = PUBLISH_MIN_INTERVAL_S if self.changed else HEARTBEAT_INTERVAL_S
        return max(0.0, last_publish + interval - now)


def _is_subscribe(frame: bytes) -> bool:
    return bool(frame) and frame[0] == 1  # XPUB delivers b"\x01topic" (subscribe) / b"\x00topic" (unsubscribe)


class CoordinatorServer:
    """The coordinator's sockets around its state: engines PUSH reports in, wave starts go out on one XPUB,
    load snapshots to the front ends on another."""

    def __init__(self, ctx: zmq.Context, addresses: CoordinatorAddresses, num_engines: int) -> None:
        self.inbound = ctx.socket(zmq.PULL)
        self.engine_pub = ctx.socket(zmq.XPUB)
        self.frontend_pub = ctx.socket(zmq.XPUB)
        for pub in (self.engine_pub, self.frontend_pub):
            pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not just the first of each topic
            pub.setsockopt(zmq.SNDHWM, 0)
        self.inbound.setsockopt(zmq.RCVHWM, 0)
        self.sockets = (self.inbound, self.engine_pub, self.frontend_pub)
        for sock in self.sockets:
            sock.setsockopt(zmq.LINGER, 0)
        security.bind(self.inbound, addresses.input, "DP coordinator")
        security.bind(self.engine_pub, addresses.engine_pub, "DP coordinator")
        security.bind(self.frontend_pub, addresses.frontend_pub, "DP coordinator")
        self.bound = CoordinatorAddresses(*(s.getsockopt_string(zmq.LAST_ENDPOINT) for s in self.sockets))
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(CoordinatorInput)
        self.state = Coordinator(num_engines)
        self.last_publish = time.monotonic()

    def run(self, death_pipe: Connection | None) -> None:
        poller = zmq.Poller()
        for sock in self.sockets:
            poller.register(sock, zmq.POLLIN)
        if death_pipe is not None:
            poller.register(death_pipe.fileno(), zmq.POLLIN)
        while True:
            timeout = self.state.next_publish_in(time.monotonic(), self.last_publish)
            events = dict(poller.poll(int(timeout * 1000) + 1))
            if death_pipe is not None and death_pipe.fileno() in events:
                logger.info("the launcher is gone; DP coordinator exiting")
                return
            self.handle_events(events)

    def handle_events(self, events: dict[Any, int]) -> None:
        if self.engine_pub in events and any(_is_subscribe(f) for f in _drain(self.engine_pub)):
            # Whoever just subscribed needs proof that its subscription is live; others ignore it.
            self.engine_pub.send(self.encoder.encode(CoordinatorHello()))
        if self.frontend_pub in events and any(_is_subscribe(f) for f in _drain(self.frontend_pub)):
            self.state.changed = True
            self.last_publish = 0.0  # a new front end gets the table now
        if self.inbound in events:
            for raw in _drain(self.inbound):
                try:
                    start = self.state.handle(self.decoder.decode(raw))
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    logger.error("dropping malformed coordinator message: %s", e)
                    continue
                if start is not None:
                    self.engine_pub.send(self.encoder.encode(start))
        now = time.monotonic()
        if self.state.next_publish_in(now, self.last_publish) == 0.0:
            self.frontend_pub.send(self.encoder.encode(self.state.snapshot()))
            self.last_publish = now

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)


def run_coordinator(addresses: CoordinatorAddresses, num_engines: int, ready_pipe: Connection | None = None,
                    death_pipe: Connection | None = None, log_level: str = "INFO") -> None:
    """Process entry point. Binds (tcp port 0 is fine), sends the bound addresses down `ready_pipe`
    (msgspec bytes), then serves until SIGTERM or until the parent dies (EOF on `death_pipe`)."""
    from elastic.logger import setup_logging

    setup_logging(log_level)

    def on_term(*_: object) -> None:
        raise SystemExit(0)  # out of the blocking poll at once

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API server orders shutdown
    ctx = zmq.Context()
    server = CoordinatorServer(ctx, addresses, num_engines)
    if ready_pipe is not None:
        ready_pipe.send_bytes(server.encoder.encode(server.bound))
        ready_pipe.close()
    logger.info("DP coordinator for %d engines (pid %d)", num_engines, os.getpid())
    try:
        server.run(death_pipe)
    except SystemExit:
        pass
    finally:
        server.close()
        ctx.term()


def _recv_or_none(sock: zmq.Socket) -> bytes | None:
    try:
        return sock.recv(zmq.NOBLOCK)
    except zmq.Again:
        return None


def _drain(sock: zmq.Socket) -> list[bytes]:
    frames = []
    while (frame := _recv_or_none(sock)) is not None:
        frames.append(frame)
    return frames


class CoordinatorProcess:
    """The launcher's handle on the coordinator process: start it, learn its addresses, stop it."""

    def __init__(self, addresses: CoordinatorAddresses, num_engines: int, log_level: str = "INFO") -> None:
        mp = multiprocessing.get_context("spawn")
        ready_reader, ready_writer = mp.Pipe(duplex=False)
        death_reader, self._death_writer = mp.Pipe(duplex=False)
        self.proc: BaseProcess = mp.Process(target=run_coordinator, name="DPCoordinator",
                                            args=(addresses, num_engines, ready_writer, death_reader, log_level),
                                            daemon=True)
        self.proc.start()
        ready_writer.close()
        death_reader.close()  # only the child keeps the read end: our exit (even SIGKILL) closes the pipe
        self._ready = ready_reader
        self.addresses: CoordinatorAddresses | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def sentinel(self) -> int:
        return self.proc.sentinel

    def wait_addresses(self, timeout: float = _START_TIMEOUT_S) -> CoordinatorAddresses:
        """Block until the coordinator has bound its sockets (call from a thread in async code)."""
        if self.addresses is None:
            if not self._ready.poll(timeout):
                raise RuntimeError(f"the DP coordinator did not start within {timeout:.0f}s")
            try:
                raw = self._ready.recv_bytes()
            except EOFError:
                self.proc.join(1.0)
                raise RuntimeError(f"the DP coordinator exited during start-up (code {self.proc.exitcode})") \
                    from None
            self.addresses = msgspec.msgpack.decode(raw, type=CoordinatorAddresses)
            self._ready.close()
        return self.addresses

    def close(self, timeout: float = 5.0) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout)
        self._death_writer.close()
        if not self._ready.closed:
            self._ready.close()
