"""An engine core's side of data parallelism: request waves and load reports, through the DP coordinator.

Ranks of one DP group step in lockstep while any of them has work (MoE layers run expert-parallel across
all of them), and pause together when none has: EngineCore.step() all-gathers "anyone unfinished?" every
step, so every rank learns at the same step that the wave is over. Waves are numbered; every rank counts
them the same way.

- Paused, a rank blocks on its input sockets and the coordinator's PUB (no CPU).
- A request reaching a paused rank starts it stepping, and it asks the coordinator to wake the others
  (StartWaveRequest(current wave, exclude=itself)); the coordinator broadcasts StartDPWave.
- StartDPWave(w) with w >= the current wave wakes a paused rank; an older w is stale (that wave is over,
  and with it the request that asked for it) and is ignored.
- When the wave ends, every rank moves to the next wave number and rank 0 reports WaveComplete.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from elastic.transport import security

from elastic.protocol.from_coordinator import CoordinatorHello, CoordinatorToEngine, StartDPWave
from elastic.protocol.from_engine import SchedulerStats
from elastic.protocol.to_coordinator import EngineLoad, StartWaveRequest, WaveComplete

logger = logging.getLogger(__name__)


@dataclass
class RequestWave:
    """This rank's request wave, the one place its state lives on the engine side: EngineCore reads and
    ends it (the per-step exchange says whether anyone has work), a new request starts it, and DPWaves
    relays starts and ends to and from the coordinator (whose table mirrors every rank's)."""

    number: int = 0
    running: bool = False


class DPWaves:
    """Owns this rank's coordinator sockets: a PUSH for reports and a SUB for wave starts."""

    def __init__(self, ctx: zmq.Context, engine_index: int, input_address: str, pub_address: str,
                 wave: RequestWave) -> None:
        self.engine_index = engine_index
        self.wave = wave
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 1000)  # a last WaveComplete / load report still gets out on close
        self.push.setsockopt(zmq.SNDHWM, 0)  # never block the busy loop on the coordinator
        security.connect(self.push, input_address)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        security.connect(self.sub, pub_address)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(CoordinatorToEngine)
        self.last_load: tuple[int, int] | None = None
        # Whether the coordinator's hello arrived (our subscription is live). `engine_index` above is this
        # engine's DP rank (the coordinator's tables are by rank), updated when a scale changes it.
        self.subscribed = False

    @property
    def sockets(self) -> list[zmq.Socket]:
        return [self.push, self.sub]

    def wait_subscribed(self, timeout_s: float) -> None:
        """Block until the coordinator's hello arrives: from then on no StartDPWave can be lost (PUB/SUB
        drops messages published before the subscription reached the publisher)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sub.poll(int(remaining * 1000)):
                raise TimeoutError(f"no hello from the DP coordinator within {timeout_s:.0f}s")
            if isinstance(self.decoder.decode(self.sub.recv()), CoordinatorHello):
                self.subscribed = True
                return

    def drain(self) -> None:
        """Apply every queued coordinator message (non-blocking)."""
        while True:
            try:
                raw = self.sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = self.decoder.decode(raw)
            if isinstance(msg, StartDPWave):
                self.on_start_wave(msg)
            elif isinstance(msg, CoordinatorHello):
                self.subscribed = True  # attached while serving (a 1 -> N scale): no blocking wait then

    def on_start_wave(self, msg: StartDPWave) -> None:
        if msg.wave < self.wave.number:
            logger.debug("engine %d ignores stale START_DP_WAVE(%d) in wave %d", self.engine_index, msg.wave,
                         self.wave.number)
            return
        self.wave.number = msg.wave
        self.wave.running = True

    def request_wave(self) -> None:
        """This paused rank just got work (and already runs): the others must wake into the same wave."""
        self._send(StartWaveRequest(self.wave.number, self.engine_index))

    def wave_over(self) -> None:
        """Called once the step that ended the wave returned (on every rank at the same step)."""
        if self.engine_index == 0:
            self._send(WaveComplete(self.wave.number))
        self.wave.number += 1

    def report_load(self, stats: SchedulerStats) -> None:
        load = (stats.num_waiting, stats.num_running)
        if load != self.last_load:
            self.last_load = load
            self._send(EngineLoad(self.engine_index, *load))

    def _send(self, msg: Any) -> None:
        self.push.send(self.encoder.encode(msg), flags=zmq.NOBLOCK)
