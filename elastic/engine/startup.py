"""An engine process's start-up, before its busy loop: prewarming (a standby), the handshake with the front
end, device and threads, the engine core itself, and the queues to every front end (engine/process.py runs
these in order)."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import msgspec
import zmq

from elastic.config import EngineConfig
from elastic.engine.scale_agent import set_cpu_threads
from elastic.engine.waves import DPWaves, RequestWave
from elastic.protocol.from_engine import EngineStartupFailed
from elastic.protocol.to_engine import HandshakeAddresses
from elastic.transport import security

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 300.0  # waiting for the front end's addresses after HELLO
OUTPUT_LINGER_MS = 2000  # let the last batch (or last words) reach the front end on close


def prewarm_standby(config: EngineConfig, engine_index: int) -> Any:
    """A standby engine's head start before HELLO (engine/standby.py); None if it failed (out of memory on
    its GPU, say): the engine then starts from scratch when claimed."""
    try:
        from elastic.engine.standby import prewarm

        set_device_and_threads(config)
        return prewarm(config)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception:
        logger.exception("standby engine %d: prewarming failed; it starts from scratch when claimed", engine_index)
        return None


def apply_parallel_handshake(config: EngineConfig, addresses: HandshakeAddresses) -> EngineConfig:
    """The front end has the last word on the parallel layout and the group rendezvous (a headless engine
    started elsewhere learns them only here)."""
    return dataclasses.replace(config, parallel=addresses.parallel)


def set_device_and_threads(config: EngineConfig) -> None:
    import torch

    if config.torch_device.type == "cuda" and config.torch_device.index is not None:
        torch.cuda.set_device(config.torch_device)  # NCCL and the allocator then use this rank's GPU
    elif config.torch_device.type == "cpu":
        set_cpu_threads(config.parallel.data_parallel_size)  # this rank's share of the host's cores


def await_handshake(sock: zmq.Socket, decoder: msgspec.msgpack.Decoder, standby: bool = False) -> HandshakeAddresses:
    """The answer to HELLO; over tcp with a shared secret, a head that refuses our key is told at once. A
    standby engine waits for it as long as the launcher lives (it answers when a scale-up claims us)."""
    watch = security.HandshakeWatch(sock) if security.is_secured(sock) else None
    deadline = float("inf") if standby else time.monotonic() + HANDSHAKE_TIMEOUT_S
    try:
        while not sock.poll(200):
            if watch is not None and watch.refused():
                raise security.AuthenticationError(
                    f"the head refused our connection: this node's data-parallel key (fingerprint "
                    f"{security.key_fingerprint()}) differs from the head's")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from the front end to HELLO within {HANDSHAKE_TIMEOUT_S:.0f}s")
    finally:
        if watch is not None:
            watch.close()
    return decoder.decode(sock.recv())


def start_core(config: EngineConfig, engine_index: int, wave: RequestWave, dp: DPWaves | None,
               handshake: zmq.Socket, encoder: msgspec.msgpack.Encoder, addresses: HandshakeAddresses,
               prewarmed: Any = None) -> Any:
    """Load the model, join the DP/EP groups, size the KV cache. A failure is told to the front end (why),
    then the process exits non-zero."""
    try:
        from elastic.engine.core import EngineCore
        from elastic.logger import warn_if_hub_kernels_active

        warn_if_hub_kernels_active(logger)
        set_device_and_threads(config)
        if addresses.join is not None:
            _injected_join_failure(engine_index)
        # Loads the weights (progress bar; a joining engine receives them instead), joins the groups, sizes
        # the KV cache.
        core = EngineCore(config, wave, epoch=addresses.epoch, join=addresses.join, prewarmed=prewarmed)
        if dp is not None:
            dp.wait_subscribed(HANDSHAKE_TIMEOUT_S)
        return core
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:  # bad checkpoint, OOM, ...
        logger.exception("engine core %d failed to start", engine_index)
        handshake.send(encoder.encode(EngineStartupFailed(engine_index, f"{type(e).__name__}: {e}")))
        raise SystemExit(1) from None


def _injected_join_failure(engine_id: int) -> None:
    """Test hook: ELASTIC_INJECT_JOIN_FAILURE=<engine id> makes that engine, started by a scale-up, die
    while starting (the scale must roll back while the others serve on)."""
    if os.environ.get("ELASTIC_INJECT_JOIN_FAILURE") == str(engine_id):
        logger.error("engine core %d: injected start-up failure (ELASTIC_INJECT_JOIN_FAILURE)", engine_id)
        os._exit(3)


def connect_queues(ctx: zmq.Context, identity: bytes,
                   addresses: HandshakeAddresses) -> tuple[list[zmq.Socket], list[zmq.Socket]]:
    """One input and one output queue per front end (API server); requests are answered where they came from."""
    inputs, outputs = [], []
    for address in addresses.frontend_input_addresses or [addresses.input_address]:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        security.connect(sock, address)
        inputs.append(sock)
    for address in addresses.frontend_output_addresses or [addresses.output_address]:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, OUTPUT_LINGER_MS)
        security.connect(sock, address)
        outputs.append(sock)
    return inputs, outputs
