"""Authenticated ZMQ over TCP: every socket between hosts runs CURVE with keys derived from one shared secret.

A multi-node deployment shares one secret (`--data-parallel-key-file`, or the ELASTIC_DATA_PARALLEL_KEY
environment variable, which local child processes inherit). Every bound TCP socket is a CURVE server whose
key pair is derived from the secret; every connecting socket must know the server's public key, so it
must know the secret. A peer without it never completes the CURVE handshake: nothing it sends reaches the
application, and the refusal is logged on both sides. CURVE also encrypts the traffic.

Without a secret, TCP is allowed on loopback only (a single host); binding any other address without a
secret is refused with an error, so a remote socket is never open to anyone. ipc:// sockets are untouched.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from typing import Any

import zmq
import zmq.utils.z85
from zmq.utils.monitor import recv_monitor_message

from elastic.transport.net import is_loopback

logger = logging.getLogger(__name__)

KEY_ENV = "ELASTIC_DATA_PARALLEL_KEY"
_REFUSAL_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_MONITOR_STOPPED)


class AuthenticationError(RuntimeError):
    """A peer refused our CURVE handshake: the shared secrets differ."""


def load_key_file(path: str | None) -> None:
    """Read the shared secret from `path` into this process's environment (children inherit it)."""
    if path is None:
        return
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 16:
        raise ValueError(f"the data-parallel key in {path} is shorter than 16 bytes")
    os.environ[KEY_ENV] = secret.decode("utf-8", "surrogateescape")


def shared_secret() -> bytes | None:
    value = os.environ.get(KEY_ENV)
    return value.encode("utf-8", "surrogateescape") if value else None


def _server_keys(secret: bytes) -> tuple[bytes, bytes]:
    """(public, secret) CURVE keys, the same on every host that holds `secret`."""
    secret_key = zmq.utils.z85.encode(hashlib.sha256(b"elastic-curve-v1:" + secret).digest())
    return zmq.curve_public(secret_key), secret_key


def key_fingerprint() -> str | None:
    """A short, non-secret name of the key in use (log lines: which key does each side have?)."""
    secret = shared_secret()
    return None if secret is None else hashlib.sha256(b"elastic-fingerprint:" + secret).hexdigest()[:8]


def _tcp_host(address: str) -> str | None:
    if not address.startswith("tcp://"):
        return None
    return address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")


def check_bind_allowed(host: str) -> None:
    """Binding `host` to the network needs the shared secret; loopback does not."""
    if host in ("*", "0.0.0.0", "::", ""):
        raise ValueError("refusing to bind every interface: give --data-parallel-address one address")
    if shared_secret() is None and not is_loopback(host):
        raise ValueError(f"refusing to open sockets on {host} without authentication: set the shared secret "
                         f"with --data-parallel-key-file FILE (or the {KEY_ENV} environment variable) on every "
                         f"node")


def bind(sock: zmq.Socket, address: str, what: str = "socket") -> str:
    """Bind `sock` (a CURVE server on tcp); returns the bound endpoint. Failed handshakes are logged."""
    host = _tcp_host(address)
    secret = shared_secret()
    if host is not None:
        check_bind_allowed(host)
        if secret is not None:
            public, secret_key = _server_keys(secret)
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = public, secret_key
            _watch(sock, what)
    sock.bind(address)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def connect(sock: zmq.Socket, address: str) -> None:
    """Connect `sock` (a CURVE client of the server that holds the shared secret, on tcp)."""
    secret = shared_secret()
    if _tcp_host(address) is not None and secret is not None:
        sock.curve_serverkey = _server_keys(secret)[0]
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()  # ours: any; the server is what we check
    sock.connect(address)


def is_secured(sock: zmq.Socket) -> bool:
    return sock.getsockopt(zmq.MECHANISM) == zmq.CURVE


# ---- refusals: logged where they happen ------------------------------------------------------------------
class _RefusalLog:
    """One daemon thread per process reads the monitor sockets of bound CURVE servers and logs each peer
    that failed the handshake. A monitor ends with its socket (EVENT_MONITOR_STOPPED), so the context can
    still terminate."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: list[tuple[Any, str]] = []
        self.thread: threading.Thread | None = None

    def add(self, monitor: Any, what: str) -> None:
        with self.lock:
            self.pending.append((monitor, what))
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="curve-refusals", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        poller, names = zmq.Poller(), {}
        while True:
            with self.lock:
                for monitor, what in self.pending:
                    poller.register(monitor, zmq.POLLIN)
                    names[monitor] = what
                self.pending.clear()
                if not names:
                    self.thread = None
                    return
            try:
                events = poller.poll(200)
            except zmq.ContextTerminated:  # the process is closing its context: let it
                events = [(monitor, 0) for monitor in names]
            for monitor, _ in events:
                if self._read(monitor, names[monitor]):
                    poller.unregister(monitor)
                    monitor.close(linger=0)
                    del names[monitor]

    @staticmethod
    def _read(monitor: Any, what: str) -> bool:
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError:
            return True
        if event["event"] == zmq.EVENT_MONITOR_STOPPED:
            return True
        endpoint = event.get("endpoint", b"").decode(errors="replace")
        logger.error("refused a connection to the %s at %s: it failed the CURVE handshake (its data-parallel "
                     "key differs from ours, fingerprint %s)", what, endpoint, key_fingerprint())
        return False


_refusals = _RefusalLog()


def _monitor(sock: zmq.Socket, events: int) -> zmq.Socket:
    """A plain (blocking-API) PAIR on `sock`'s monitor, also for asyncio sockets: read from any thread."""
    address = f"inproc://monitor-{uuid.uuid4().hex}"
    sock.monitor(address, events)
    pair = zmq.Context.shadow(sock.context.underlying).socket(zmq.PAIR)
    pair.connect(address)
    return pair


def _watch(sock: zmq.Socket, what: str) -> None:
    _refusals.add(_monitor(sock, _REFUSAL_EVENTS), what)


class HandshakeWatch:
    """Client side: a CURVE server that does not accept our handshake drops the connection before it
    succeeds. After `max_failures` such drops in a row, `refused()` says so (the shared secrets differ)."""

    def __init__(self, sock: zmq.Socket, max_failures: int = 3) -> None:
        self.sock = sock
        self.monitor = _monitor(sock, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.failures, self.max_failures, self.succeeded = 0, max_failures, False

    def refused(self) -> bool:
        while not self.succeeded and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded = True
            else:
                self.failures += 1
        return not self.succeeded and self.failures >= self.max_failures

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
