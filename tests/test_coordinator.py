"""The DP coordinator: its state machine (waves, stale waves, resize) and its process over real sockets."""
from __future__ import annotations

import multiprocessing as mp
import shutil
import tempfile
import time

import msgspec
import pytest
import zmq

from elastic.cluster.coordinator import (HEARTBEAT_INTERVAL_S, PUBLISH_MIN_INTERVAL_S, Coordinator,
                                         CoordinatorAddresses, CoordinatorProcess)
from elastic.protocol.from_coordinator import CoordinatorHello, CoordinatorToEngine, LoadSnapshot, StartDPWave
from elastic.protocol.to_coordinator import EngineLoad, ScaleElasticEP, StartWaveRequest, WaveComplete


def test_waves_start_complete_and_stale_requests() -> None:
    c = Coordinator(3)
    assert (c.wave, c.running) == (0, False)
    # A paused rank got a request in wave 0: the others are told to join wave 0.
    assert c.handle(StartWaveRequest(0, exclude_engine=1)) == StartDPWave(0, 1)
    assert (c.wave, c.running) == (0, True)
    # Another rank got one at the same time: broadcasting again is harmless (running ranks ignore it).
    assert c.handle(StartWaveRequest(0, exclude_engine=2)) == StartDPWave(0, 2)
    assert c.handle(WaveComplete(0)) is None
    assert (c.wave, c.running) == (1, False)
    # A request for wave 0 arriving now is stale: that wave (and the request that asked) is over.
    assert c.handle(StartWaveRequest(0, exclude_engine=0)) is None
    assert (c.wave, c.running) == (1, False)
    # A duplicate completion of an old wave changes nothing.
    assert c.handle(WaveComplete(0)) is None
    assert (c.wave, c.running) == (1, False)


def test_start_request_overtaking_the_completion_keeps_the_new_wave_running() -> None:
    """Rank 0's WaveComplete(0) and rank 1's StartWaveRequest(1) come from different sockets, in any order."""
    c = Coordinator(2)
    c.handle(StartWaveRequest(0, 0))
    assert c.handle(StartWaveRequest(1, exclude_engine=1)) == StartDPWave(1, 1)
    assert c.handle(WaveComplete(0)) is None  # late: must not pause wave 1
    assert (c.wave, c.running) == (1, True)
    c.handle(WaveComplete(1))
    assert (c.wave, c.running) == (2, False)


def test_load_table_snapshot_and_resize() -> None:
    c = Coordinator(2)
    c.snapshot()
    assert not c.changed
    c.handle(EngineLoad(1, num_waiting=3, num_running=2))
    assert c.changed
    snap = c.snapshot()
    assert snap.counts == [[0, 0], [3, 2]] and not c.changed
    c.handle(EngineLoad(1, 3, 2))  # unchanged: nothing new to publish
    assert not c.changed
    c.handle(EngineLoad(7, 1, 1))  # an engine outside the table (e.g. just removed) is ignored
    assert c.snapshot().counts == [[0, 0], [3, 2]]
    c.handle(ScaleElasticEP(4))
    assert c.snapshot().counts == [[0, 0], [3, 2], [0, 0], [0, 0]]
    c.handle(ScaleElasticEP(1))
    assert c.snapshot().counts == [[0, 0]]
    c.handle(ScaleElasticEP(0))  # refused
    assert len(c.snapshot().counts) == 1


def test_publish_timing() -> None:
    c = Coordinator(1)
    assert c.next_publish_in(10.0, last_publish=10.0) == pytest.approx(PUBLISH_MIN_INTERVAL_S)
    c.snapshot()
    assert c.next_publish_in(10.0, last_publish=10.0) == pytest.approx(HEARTBEAT_INTERVAL_S)
    c.handle(EngineLoad(0, 1, 0))
    assert c.next_publish_in(10.5, last_publish=10.0) == 0.0  # changed, and the rate limit has passed


def _recv(sock: zmq.Socket, decoder: msgspec.msgpack.Decoder, timeout_s: float = 10.0):
    assert sock.poll(int(timeout_s * 1000)), "nothing received"
    return decoder.decode(sock.recv())


def test_coordinator_process_over_sockets() -> None:
    tmp = tempfile.mkdtemp(prefix="coord-", dir="/tmp")
    names = CoordinatorAddresses(f"ipc://{tmp}/in", f"ipc://{tmp}/eng", "tcp://127.0.0.1:0")
    coord = CoordinatorProcess(names, num_engines=2, log_level="WARNING")
    ctx = zmq.Context()
    try:
        addresses = coord.wait_addresses(60)
        assert addresses.input == names.input and addresses.frontend_pub.startswith("tcp://127.0.0.1:")
        assert not addresses.frontend_pub.endswith(":0")  # the bound port, not the wildcard
        push = ctx.socket(zmq.PUSH)
        push.connect(addresses.input)
        engines = []
        engine_decoder = msgspec.msgpack.Decoder(CoordinatorToEngine)
        for _ in range(2):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(addresses.engine_pub)
            # Each new subscriber gets a hello: proof that it will not miss a START_DP_WAVE.
            assert isinstance(_recv(sub, engine_decoder), CoordinatorHello)
            engines.append(sub)
        frontend = ctx.socket(zmq.SUB)
        frontend.setsockopt(zmq.SUBSCRIBE, b"")
        frontend.connect(addresses.frontend_pub)
        snap_decoder = msgspec.msgpack.Decoder(LoadSnapshot)
        started = time.monotonic()
        first = _recv(frontend, snap_decoder)  # sent on subscription, not at the next heartbeat
        assert first.counts == [[0, 0], [0, 0]] and time.monotonic() - started < HEARTBEAT_INTERVAL_S

        def next_start_wave(sub: zmq.Socket) -> StartDPWave:
            while True:
                msg = _recv(sub, engine_decoder)
                if isinstance(msg, StartDPWave):
                    return msg

        enc = msgspec.msgpack.Encoder()
        push.send(enc.encode(StartWaveRequest(0, 1)))
        assert [next_start_wave(s) for s in engines] == [StartDPWave(0, 1)] * 2
        push.send(enc.encode(EngineLoad(0, 2, 1)))
        while (snap := _recv(frontend, snap_decoder)).counts != [[2, 1], [0, 0]]:
            pass
        assert (snap.wave, snap.running) == (0, True)
        push.send(enc.encode(WaveComplete(0)))
        push.send(enc.encode(StartWaveRequest(0, 0)))  # stale now: no broadcast
        push.send(enc.encode(StartWaveRequest(1, 0)))
        assert next_start_wave(engines[0]) == StartDPWave(1, 0)  # the stale one was never sent
        push.send(b"\x93garbage")  # a malformed message is dropped, the coordinator lives on
        push.send(enc.encode(ScaleElasticEP(3)))
        while len((snap := _recv(frontend, snap_decoder)).counts) != 3:
            pass
        assert coord.proc.is_alive()
    finally:
        ctx.destroy(linger=0)
        coord.close()
        shutil.rmtree(tmp, ignore_errors=True)
    assert coord.proc.exitcode == 0


def test_coordinator_exits_with_its_launcher(tmp_path) -> None:
    """The coordinator holds the read end of a pipe only its launcher can write: EOF means the launcher died."""
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_launch_and_report, args=(child_conn, str(tmp_path)))
    proc.start()
    try:
        assert parent_conn.poll(60), "the launcher never reported"
        pid = parent_conn.recv()
        proc.kill()  # the launcher dies without any clean-up
        proc.join(10)
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the coordinator outlived its launcher"
    finally:
        if proc.is_alive():
            proc.kill()


def _launch_and_report(conn, tmp: str) -> None:
    coord = CoordinatorProcess(CoordinatorAddresses(*(f"ipc://{tmp}/{n}" for n in ("a", "b", "c"))), 1, "WARNING")
    coord.wait_addresses(60)
    conn.send(coord.pid)
    time.sleep(600)  # killed by the test


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
