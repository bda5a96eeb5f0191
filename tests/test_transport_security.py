"""Authenticated TCP between nodes (elastic/transport): CURVE from one shared secret, refusals logged, no
unauthenticated socket off loopback; and the multi-node options' checks. No processes: fast."""
from __future__ import annotations

import logging
import time

import pytest
import zmq
from checkpoints import make_checkpoint

from elastic.config import create_engine_config
from elastic.transport import security
from elastic.transport.net import local_address_towards


@pytest.fixture()
def ctx():
    context = zmq.Context()
    yield context
    context.term()


def _pair(ctx: zmq.Context, monkeypatch: pytest.MonkeyPatch, server_key: str, client_key: str):
    monkeypatch.setenv(security.KEY_ENV, server_key)
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    address = security.bind(server, "tcp://127.0.0.1:0", "test socket")
    monkeypatch.setenv(security.KEY_ENV, client_key)
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    watch = security.HandshakeWatch(client)
    security.connect(client, address)
    client.send(b"hello")
    return server, client, watch


def test_same_secret_talks(ctx, monkeypatch) -> None:
    server, client, watch = _pair(ctx, monkeypatch, "s" * 32, "s" * 32)
    assert server.poll(10_000) and server.recv_multipart()[1] == b"hello"
    assert security.is_secured(client) and not watch.refused()
    for sock in (watch, client, server):
        sock.close()


def test_wrong_secret_is_refused_and_logged(ctx, monkeypatch, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="elastic.transport.security")
    server, client, watch = _pair(ctx, monkeypatch, "a" * 32, "b" * 32)
    deadline = time.monotonic() + 10
    while not watch.refused() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert watch.refused()
    assert not server.poll(200)  # nothing reached the application
    while "failed the CURVE handshake" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "failed the CURVE handshake" in caplog.text
    for sock in (watch, client, server):
        sock.close()


def test_no_unauthenticated_bind_off_loopback(ctx, monkeypatch) -> None:
    monkeypatch.delenv(security.KEY_ENV, raising=False)
    sock = ctx.socket(zmq.ROUTER)
    with pytest.raises(ValueError, match="without authentication"):
        security.bind(sock, "tcp://10.1.2.3:0")
    with pytest.raises(ValueError, match="every interface"):
        security.check_bind_allowed("0.0.0.0")
    security.bind(sock, "tcp://127.0.0.1:0")  # loopback without a secret: one host, as before
    assert not security.is_secured(sock)
    sock.close()


def test_key_file(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(security.KEY_ENV, raising=False)
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="shorter than 16 bytes"):
        security.load_key_file(str(short))
    good = tmp_path / "good"
    good.write_text("0123456789abcdef0123\n")
    security.load_key_file(str(good))
    assert security.shared_secret() == b"0123456789abcdef0123"


def test_local_address_towards() -> None:
    assert local_address_towards("127.0.0.1") == "127.0.0.1"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("ckpt")))


@pytest.mark.parametrize("options, message", [
    (dict(data_parallel_size=4, data_parallel_size_local=2), "--data-parallel-address"),
    (dict(data_parallel_size=4, headless=True, data_parallel_address="10.0.0.1", data_parallel_rpc_port=1),
     "--data-parallel-start-rank"),
    (dict(data_parallel_size=4, data_parallel_start_rank=3, data_parallel_size_local=2,
          data_parallel_address="10.0.0.1", data_parallel_rpc_port=1), "do not fit"),
    (dict(data_parallel_external_rank=1, data_parallel_hybrid_lb=True, data_parallel_address="10.0.0.1",
          data_parallel_rpc_port=1), "external LB"),
    (dict(data_parallel_backend="ray"), "needs --data-parallel-address"),
    (dict(data_parallel_backend="ray", data_parallel_address="10.0.0.1", data_parallel_rpc_port=1,
          data_parallel_hybrid_lb=True, data_parallel_size_local=1), "excludes"),
])
def test_node_options_are_checked(checkpoint, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        create_engine_config(checkpoint, device="cpu", **options)


def test_node_roles(checkpoint) -> None:
    p = create_engine_config(checkpoint, device="cpu", data_parallel_size=4, data_parallel_size_local=2,
                             data_parallel_start_rank=2, headless=True, data_parallel_address="10.0.0.1",
                             data_parallel_rpc_port=13345).parallel
    assert list(p.local_ranks) == [2, 3] and not p.is_head and not p.local_load_balancing
    p = create_engine_config(checkpoint, device="cpu", data_parallel_size=2, data_parallel_external_rank=0,
                             data_parallel_address="10.0.0.1", data_parallel_rpc_port=13345).parallel
    assert list(p.local_ranks) == [0] and p.is_head and p.local_load_balancing


def test_authenticated_store(monkeypatch) -> None:
    """The groups' store across machines: every torch Store operation, waits answered when the key comes
    or with an error at the timeout; a client with another secret gets nothing."""
    import datetime
    import threading

    from elastic.transport import store
    from elastic.transport.store import StoreClient, StoreServer

    monkeypatch.setattr(store, "REPLY_SLACK_S", 0.5)
    monkeypatch.setenv(security.KEY_ENV, "k" * 32)
    server = StoreServer("127.0.0.1")
    try:
        client = StoreClient("127.0.0.1", server.port, datetime.timedelta(seconds=5))
        client.set("a", b"1")
        assert client.get("a") == b"1" and server.get("a") == b"1"
        assert client.add("n", 2) == 2 and server.add("n", 3) == 5 and client.check(["a", "n"])
        assert client.compare_set("c", b"", b"x") == b"x" and client.compare_set("c", b"y", b"z") == b"x"
        assert client.num_keys() == 3 and client.delete_key("c") and not client.check(["c"])
        threading.Timer(0.2, lambda: server.set("late", "v")).start()
        assert client.get("late") == b"v"  # waited for it
        client.set_timeout(datetime.timedelta(seconds=0.3))
        with pytest.raises(RuntimeError, match="timed out"):
            client.get("never")
        monkeypatch.setenv(security.KEY_ENV, "x" * 32)
        stranger = StoreClient("127.0.0.1", server.port, datetime.timedelta(seconds=0.2))
        with pytest.raises(TimeoutError):
            stranger.get("a")
    finally:
        server.close()
