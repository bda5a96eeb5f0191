"""The groups' rendezvous store over authenticated ZMQ, for deployments with a shared secret.

torch's TCPStore listens on every interface and has no authentication; across machines the head serves
this store instead: a ROUTER bound on the configured address only, CURVE with the shared secret (see
security.py), msgspec messages. `StoreClient` is a `torch.distributed.Store`, so gloo and NCCL rendezvous
through it unchanged (also under a PrefixStore); `StoreServer` is the head's copy, which the launcher (and
fault recovery) also reads and writes directly. Calls that wait (get, wait) are answered when the key
appears, or with an error at the caller's timeout. Each thread of a client has its own socket (ZMQ sockets
are not thread-safe, and a group built in a background thread may wait while the busy loop heartbeats).
"""
from __future__ import annotations

import datetime
import threading
import time
import uuid
from typing import Any

import msgspec
import torch.distributed as dist
import zmq

from elastic.transport import security

REPLY_SLACK_S = 5.0  # beyond a call's own timeout: the server answers waiters at their deadline

class StoreRequest(msgspec.Struct, array_like=True):
    op: str  # set get add check wait compare_set delete_key num_keys
    keys: list[str] = []
    value: bytes = b""
    expected: bytes = b""
    amount: int = 0
    timeout_s: float = 0.0


class StoreReply(msgspec.Struct, array_like=True):
    value: bytes = b""
    number: int = 0
    error: str | None = None


class _Table:
    """The data and its rules, shared by the server thread and direct callers (under one lock)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def apply(self, req: StoreRequest) -> StoreReply | None:
        """The reply, or None while a get/wait must wait for its keys."""
        with self.lock:
            d, keys = self.data, req.keys
            if req.op in ("get", "wait") and not all(k in d for k in keys):
                return None
            if req.op == "set":
                d[keys[0]] = req.value
            elif req.op == "get":
                return StoreReply(d[keys[0]])
            elif req.op == "add":
                number = int(d.get(keys[0], b"0")) + req.amount
                d[keys[0]] = str(number).encode()
                return StoreReply(number=number)
            elif req.op == "check":
                return StoreReply(number=int(all(k in d for k in keys)))
            elif req.op == "compare_set":
                current = d.get(keys[0])
                if (current is None and req.expected == b"") or current == req.expected:
                    d[keys[0]] = current = req.value
                return StoreReply(current if current is not None else req.expected)
            elif req.op == "delete_key":
                return StoreReply(number=int(d.pop(keys[0], None) is not None))
            elif req.op == "num_keys":
                return StoreReply(number=len(d))
            elif req.op != "wait":
                return StoreReply(error=f"unknown store operation {req.op!r}")
            return StoreReply()


class StoreServer:
    """The head's store: serves clients on `tcp://host:<port>` from a daemon thread."""

    def __init__(self, host: str) -> None:
        self.table = _Table()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        endpoint = security.bind(self.sock, f"tcp://{host}:0", "groups' store")
        self.host, self.port = host, int(endpoint.rsplit(":", 1)[1])
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="group-store", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(StoreRequest)
        waiting: list[tuple[list[bytes], StoreRequest, float]] = []
        while not self.closed.is_set():
            if self.sock.poll(50):
                *route, payload = self.sock.recv_multipart()
                try:
                    req = decoder.decode(payload)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    self.sock.send_multipart([*route, encoder.encode(StoreReply(error=f"bad request: {e}"))])
                    continue
                waiting.append((route, req, time.monotonic() + req.timeout_s))
            now, still = time.monotonic(), []
            for route, req, deadline in waiting:  # a set may have satisfied any waiter
                reply = self.table.apply(req)
                if reply is None and now > deadline:
                    reply = StoreReply(error=f"timed out after {req.timeout_s:g}s waiting for keys {req.keys}")
                if reply is None:
                    still.append((route, req, deadline))
                else:
                    self.sock.send_multipart([*route, encoder.encode(reply)])
            waiting = still
        self.sock.close(linger=0)
        self.ctx.term()

    # Direct use in the head's process (the launcher, fault recovery): the same operations, no socket.
    def set(self, key: str, value: bytes | str) -> None:
        self.table.apply(StoreRequest("set", [key], _bytes(value)))

    def get(self, key: str) -> bytes:
        reply = self.table.apply(StoreRequest("get", [key]))
        if reply is None:
            raise KeyError(key)
        return reply.value

    def add(self, key: str, amount: int) -> int:
        return self.table.apply(StoreRequest("add", [key], amount=amount)).number  # type: ignore[union-attr]

    def check(self, keys: list[str]) -> bool:
        return bool(self.table.apply(StoreRequest("check", list(keys))).number)  # type: ignore[union-attr]

    def close(self) -> None:
        self.closed.set()


class StoreClient(dist.Store):
    """A torch Store backed by the head's StoreServer (per-thread sockets)."""

    def __init__(self, host: str, port: int, timeout: datetime.timedelta) -> None:
        super().__init__()
        self.address, self.timeout_s = f"tcp://{host}:{port}", timeout.total_seconds()
        self.ctx = zmq.Context.instance()
        self.local = threading.local()
        self.encoder, self.decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(StoreReply)

    def _call(self, req: StoreRequest) -> StoreReply:
        sock = getattr(self.local, "sock", None)
        if sock is None:
            sock = self.local.sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
            security.connect(sock, self.address)
        sock.send(self.encoder.encode(req))
        if not sock.poll(int((req.timeout_s + REPLY_SLACK_S) * 1000)):
            sock.close(linger=0)  # a late reply must not answer the next call
            self.local.sock = None
            raise TimeoutError(f"the groups' store at {self.address} did not answer")
        reply = self.decoder.decode(sock.recv())
        if reply.error is not None:
            raise RuntimeError(f"groups' store: {reply.error}")
        return reply

    def set(self, key: str, value: Any) -> None:
        self._call(StoreRequest("set", [key], _bytes(value)))

    def get(self, key: str) -> bytes:
        return self._call(StoreRequest("get", [key], timeout_s=self.timeout_s)).value

    def add(self, key: str, amount: int) -> int:
        return self._call(StoreRequest("add", [key], amount=amount)).number

    def check(self, keys: list[str]) -> bool:
        return bool(self._call(StoreRequest("check", list(keys))).number)

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        seconds = timeout.total_seconds() if timeout is not None else self.timeout_s
        self._call(StoreRequest("wait", list(keys), timeout_s=seconds))

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        return self._call(StoreRequest("compare_set", [key], _bytes(desired), _bytes(expected))).value

    def delete_key(self, key: str) -> bool:
        return bool(self._call(StoreRequest("delete_key", [key])).number)

    def num_keys(self) -> int:
        return self._call(StoreRequest("num_keys")).number

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self.timeout_s = timeout.total_seconds()


def _bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return bytes(value)
