"""Stateless process groups: built from a TCPStore rendezvous, outside torch.distributed's global
state, so a process can destroy its groups and build new ones of another size and rank while it runs.

One long-lived TCPStore (hosted by whoever launched the ranks) serves every generation of groups; each
group takes its own key prefix (`name/generation`), so re-creation needs no new port.
"""
from __future__ import annotations

import datetime
import logging
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, Store, TCPStore

from elastic.transport.net import local_address_towards
from elastic.transport.security import shared_secret
from elastic.transport.store import StoreClient, StoreServer

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(seconds=120)


def create_store(host: str, port: int, is_master: bool,
                 timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> TCPStore:
    """The rendezvous store. The master passes port 0 and publishes `store.port` (no port race). With a
    shared secret (ranks on several machines) it is the authenticated one, bound on `host` only."""
    if shared_secret() is not None:
        return StoreServer(host) if is_master else StoreClient(host, port, timeout)  # type: ignore[return-value]
    return TCPStore(host, port, is_master=is_master, timeout=timeout, wait_for_workers=False, use_libuv=True)


class StatelessGroup:
    """A process group over `world_size` ranks: gloo (CPU tensors) or NCCL (CUDA tensors)."""

    def __init__(self, store: Store, name: str, rank: int, world_size: int, backend: str,
                 device: torch.device | None = None, host: str = "127.0.0.1",
                 timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of {world_size}")
        self.name, self.rank, self.world_size, self.backend = name, rank, world_size, backend
        self.timeout = timeout
        self.device = device or torch.device("cpu")
        prefixed = PrefixStore(name, store)
        self.store = prefixed  # this group's own keys (rendezvous of buffers built over the group)
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            # Bind to the interface that reaches the rendezvous host (loopback for local ranks), never a guess.
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address_towards(host))]
            self.pg: dist.ProcessGroup = dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
        elif backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
            self.pg._set_default_device(self.device) if hasattr(self.pg, "_set_default_device") else None
        else:
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        self._destroyed = False
        # Called by abort(): device-side waits of buffers built over this group (peer_exchange.py).
        self.on_abort: list[Callable[[], None]] = []

    # ---- collectives (blocking on the host for gloo; stream-ordered for NCCL) --------------------------
    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        opts = dist.AllreduceOptions()
        opts.reduceOp = op
        self.pg.allreduce([tensor], opts).wait()
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[n, ...] from every rank -> [world_size * n, ...] in rank order."""
        out = tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
        self.pg._allgather_base(out, tensor.contiguous()).wait()
        return out

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        """[world_size * n, ...] summed over ranks; this rank keeps its n rows."""
        out = tensor.new_empty((tensor.shape[0] // self.world_size, *tensor.shape[1:]))
        opts = dist.ReduceScatterOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        self.pg._reduce_scatter_base(out, tensor.contiguous(), opts).wait()
        return out

    def all_to_all(self, tensor: torch.Tensor, input_splits: list[int], output_splits: list[int]) -> torch.Tensor:
        """Rows [sum(input_splits), ...] sent in rank-ordered chunks; returns the chunks received."""
        out = tensor.new_empty((sum(output_splits), *tensor.shape[1:]))
        self.pg.alltoall_base(out, tensor.contiguous(), output_splits, input_splits, dist.AllToAllOptions()).wait()
        return out

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()
        return tensor

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> dist.Work:
        return self.pg.send([tensor], dst, tag)

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> dist.Work:
        return self.pg.recv([tensor], src, tag)

    def barrier(self) -> None:
        # A tiny all-reduce rather than pg.barrier(): works the same on both backends.
        self.all_reduce(torch.zeros(1, device=self.device))

    def gather_via_store(self, key: str, value: bytes | str) -> list[bytes]:
        """Every rank's `value` under `key`, in rank order, through the group's store: no backend collective,
        so it works before the communicator exists and beside another thread's collectives."""
        self.store.set(f"{key}/{self.rank}", value)
        return [self.store.get(f"{key}/{r}") for r in range(self.world_size)]

    def abort(self) -> None:
        """A peer died: waits under way on the device return (with garbage) instead of hanging, and the next
        collective fails. Gloo needs nothing: a closed peer connection raises."""
        for hook in self.on_abort:
            hook()
        if self.backend == "nccl":
            self.pg.abort()

    def destroy(self) -> None:
        """Release communicators, threads and sockets now (not at garbage collection)."""
        if self._destroyed:
            return
        self._destroyed = True
        try:
            self.pg.shutdown()
        except Exception as e:  # an aborted peer may already have torn the connection down
            logger.debug("shutdown of group %s: %s", self.name, e)
        del self.pg

    def __repr__(self) -> str:
        return f"StatelessGroup({self.name}, rank {self.rank}/{self.world_size}, {self.backend})"
