"""The DP coordinator process (runs when data_parallel_size > 1).

It keeps each engine's waiting/running counts and publishes them to every API server (at most every
100 ms while they change, and every few seconds regardless, as a heartbeat), tracks the request wave
(running or paused), wakes paused engines with START_DP_WAVE when one of them gets a request, and resizes
its engine table on SCALE_ELASTIC_EP.

Sockets (all bound here):
  input         PULL  <- engines' EngineLoad / WaveComplete / StartWaveRequest, front ends' ScaleElasticEP
  engine_pub    PUB   -> engines: StartDPWave
  frontend_pub  PUB   -> API servers: LoadSnapshot
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

import msgspec
import zmq

from elastic.protocol.from_coordinator import LoadSnapshot, StartDPWave
from elastic.protocol.to_coordinator import (CoordinatorInput, EngineLoad, ScaleElasticEP, StartWaveRequest,
                                             WaveComplete)

logger = logging.getLogger(__name__)

PUBLISH_MIN_INTERVAL_S = 0.1
HEARTBEAT_INTERVAL_S = 2.0


@dataclass(frozen=True)
class CoordinatorAddresses:
    input: str
    engine_pub: str
    frontend_pub: str


class Coordinator:
    """State and message handling, separate from the sockets so the logic reads (and tests) plainly."""

    def __init__(self, num_engines: int) -> None:
        self.counts: list[list[int]] = [[0, 0] for _ in range(num_engines)]
        self.wave = 0
        self.running = False
        self.changed = True

    def handle(self, msg: CoordinatorInput) -> StartDPWave | None:
        """Apply one message; returns a wave start to broadcast to the engines, if any."""
        if isinstance(msg, EngineLoad):
            if msg.engine_index < len(self.counts):
                new = [msg.num_waiting, msg.num_running]
                if self.counts[msg.engine_index] != new:
                    self.counts[msg.engine_index] = new
                    self.changed = True
        elif isinstance(msg, WaveComplete):
            if msg.wave >= self.wave:
                self.wave, self.running, self.changed = msg.wave + 1, False, True
        elif isinstance(msg, StartWaveRequest):
            if msg.wave >= self.wave:  # an older wave's request is stale: that wave already ended
                self.wave, self.running, self.changed = msg.wave, True, True
                return StartDPWave(msg.wave, msg.exclude_engine)
        elif isinstance(msg, ScaleElasticEP):
            n = msg.new_engine_count
            if n < 1:
                logger.warning("ignoring SCALE_ELASTIC_EP to %d engines", n)
                return None
            self.counts = (self.counts + [[0, 0] for _ in range(n)])[:n]
            self.changed = True
            logger.info("engine table resized to %d engines", n)
        return None

    def snapshot(self) -> LoadSnapshot:
        self.changed = False
        return LoadSnapshot([list(c) for c in self.counts], self.wave, self.running)


def run_coordinator(addresses: CoordinatorAddresses, num_engines: int, parent_pid: int | None = None) -> None:
    """Process entry point; returns when the parent dies or on SIGTERM."""
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API server orders shutdown
    ctx = zmq.Context()
    inbound = ctx.socket(zmq.PULL)
    inbound.bind(addresses.input)
    engine_pub = ctx.socket(zmq.PUB)
    engine_pub.bind(addresses.engine_pub)
    frontend_pub = ctx.socket(zmq.PUB)
    frontend_pub.bind(addresses.frontend_pub)
    decoder = msgspec.msgpack.Decoder(CoordinatorInput)
    encoder = msgspec.msgpack.Encoder()
    state = Coordinator(num_engines)
    last_publish = 0.0
    try:
        while not stop and (parent_pid is None or os.getppid() == parent_pid):
            if inbound.poll(int(PUBLISH_MIN_INTERVAL_S * 1000)):
                while True:
                    try:
                        raw = inbound.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        start = state.handle(decoder.decode(raw))
                    except msgspec.DecodeError as e:
                        logger.error("dropping malformed coordinator message: %s", e)
                        continue
                    if start is not None:
                        engine_pub.send(encoder.encode(start))
            now = time.monotonic()
            due = now - last_publish >= (PUBLISH_MIN_INTERVAL_S if state.changed else HEARTBEAT_INTERVAL_S)
            if due:
                frontend_pub.send(encoder.encode(state.snapshot()))
                last_publish = now
    finally:
        for sock in (inbound, engine_pub, frontend_pub):
            sock.close(linger=0)
        ctx.term()
