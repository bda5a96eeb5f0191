"""The per-step DP exchange through shared memory, for ranks of one host.

Every step each rank tells every other a few integers (tokens, has work, decode only, votes). Over gloo this
is a TCP all-gather: ~0.5-0.8 ms per step on an H200 host (benchmarks/decode.py, DP=2), paid on the host
while the GPU waits. Here each rank writes its row into a small file in /dev/shm that every rank maps, then
waits until every row shows this exchange's sequence number: a few microseconds.

Layout: int64 [2, W, 1 + width]; exchange n uses slot n % 2 and row `rank` = [n, values...]. A rank can be
at most one exchange ahead of another (it cannot finish n + 1 before every rank posted n + 1, which each does
only after reading n), so two slots never mix. The sequence number is written after the values; x86 stores
become visible in program order (on weakly ordered hosts the gloo path is used).
"""
from __future__ import annotations

import mmap
import os
import platform
import socket
import time
import uuid

import numpy as np

from elastic.distributed.group import StatelessGroup

_SHM_DIR = "/dev/shm"


def on_one_host(group: StatelessGroup) -> bool:
    """Whether every rank of `group` runs on this host (decided alike on every rank, through the store)."""
    return len(set(group.gather_via_store("host", f"{socket.gethostname()}/{_boot_id()}"))) == 1


def shared_memory_usable() -> bool:
    return os.path.isdir(_SHM_DIR) and platform.machine() in ("x86_64", "AMD64")


class SharedMemoryAllGather:
    def __init__(self, group: StatelessGroup, width: int) -> None:
        """A collective of `group` (all ranks on this host). The file is unlinked as soon as every rank
        mapped it, so nothing stays behind in /dev/shm whatever happens to the processes later."""
        self.rank, self.world, self.width = group.rank, group.world_size, width
        self.timeout_s = group.timeout.total_seconds()
        nbytes = 2 * self.world * (1 + width) * 8
        if self.rank == 0:
            path = os.path.join(_SHM_DIR, f"elastic-dp-{uuid.uuid4().hex}")
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, nbytes)
            group.store.set("shm-path", path)
        else:
            path = group.store.get("shm-path").decode()
            fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        group.barrier()  # every rank mapped it
        if self.rank == 0:
            os.unlink(path)
        self.rows = np.frombuffer(self._map, dtype=np.int64).reshape(2, self.world, 1 + width)
        self.sequence = 0
        self.aborted = False
        group.on_abort.append(self.abort)

    def all_gather(self, values: list[int]) -> np.ndarray:
        """This rank's `width` values -> every rank's, [W, width] int64 (a copy)."""
        self.sequence += 1
        slot = self.rows[self.sequence % 2]
        slot[self.rank, 1:] = values
        slot[self.rank, 0] = self.sequence  # last: a rank that sees it sees the values
        self._wait(slot[:, 0])
        return slot[:, 1:].copy()

    def _wait(self, posted: np.ndarray) -> None:
        spins, deadline = 0, None
        while not (posted == self.sequence).all():
            if self.aborted:
                raise RuntimeError("DP exchange aborted: a peer rank failed")
            spins += 1
            if spins < 2000:
                time.sleep(0)  # lets this process's other threads run; microseconds
                continue
            # Long waits (a peer still in a long step, or gone): back off, and give up at the deadline.
            deadline = deadline or time.monotonic() + self.timeout_s
            if time.monotonic() > deadline:
                raise TimeoutError(f"DP exchange: no word from ranks {np.flatnonzero(posted != self.sequence)} "
                                   f"in {self.timeout_s:.0f}s")
            time.sleep(min(1e-3, 1e-5 * (spins - 1999)))

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.rows = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
