"""One engine core process as its launcher keeps it (pid, handshake state, what it reported), how its exit
reads in a log line, and where engines' ipc:// sockets live."""
from __future__ import annotations

import asyncio
import signal
import tempfile
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from elastic.protocol.to_engine import HandshakeAddresses

_MAX_IPC_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin for the socket name


class EngineStartupError(RuntimeError):
    """An engine core could not start (bad checkpoint, out of memory, died during start-up)."""


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exited"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        hint = " (possibly the out-of-memory killer; see dmesg)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode}"


def make_socket_dir() -> str:
    """A private directory for ipc:// socket files (ipc paths are limited to ~107 bytes)."""
    base = tempfile.gettempdir()
    if len(base) > _MAX_IPC_PATH - 30:
        base = "/tmp"
    return tempfile.mkdtemp(prefix="elastic-", dir=base)


@dataclass
class EngineProcess:
    index: int  # the engine id: stable for the process's life, unlike its DP rank
    identity: bytes
    proc: BaseProcess | None = None
    death_writer: Connection | None = None  # held open for the engine's lifetime; closing it stops the engine
    pid: int | None = None
    num_kv_blocks: int = 0
    ready: bool = False
    exit_reason: str | None = None
    exited: asyncio.Future | None = field(default=None, repr=False)
    # Elastic scaling: the handshake answer of an engine started by a scale-up, whether its exit is
    # expected (it left, or its scale was rolled back), and replies awaited on the control channel.
    hello_reply: HandshakeAddresses | None = field(default=None, repr=False)
    ready_fut: asyncio.Future | None = field(default=None, repr=False)
    retiring: bool = False
    free_memory_bytes: int | None = None  # reported with READY (CUDA)
    expert_slot_capacity: int | None = None  # expert slots per layer its storage holds (READY, each commit)
    device: str | None = None  # the device it was started on (this host's engines)
    # A standby (cluster/standby.py): the (size, rank) it prewarms for until a scale-up claims it.
    standby: tuple[int, int] | None = None
    hello_seen: bool = False  # its HELLO came before anyone claimed it: the claim answers at once
    waiters: dict[tuple[type, str], asyncio.Future] = field(default_factory=dict, repr=False)


