"""The peer-to-peer expert-parallel exchange: one buffer per rank that every rank of the EP group maps (CUDA
IPC, peer-to-peer over NVLink; nothing multicast), and the per-layer protocol of elastic.kernels.ep_p2p on
it: dispatch (+ barrier, in the same kernel), local experts, combine push (+ barrier), sum (in the next
RMSNorm's kernel where the model lets it: `UnreducedRows`); a step of one row per rank takes the low-latency
protocol instead (flagged words, no barrier: kernels/ep_ll_triton.py).

Compared with NCCL all-gather + reduce-scatter it moves the same bytes but as a few fixed-shape kernels
(no proxy thread, no protocol handshakes), so a decode step's MoE exchange costs a few microseconds more than
the copies. It serves steps of at most `capacity` tokens per rank: decode (CUDA graphs) and prefill chunks
as far as the buffer budget allows (NCCL's all-gather chose its low-latency protocol for a 1 024-token
prefill and took ~1 ms per layer on 2 H200s); larger steps take NCCL.

A dead peer leaves a barrier waiting: `abort()` (fault recovery, from another thread) raises a flag the
barriers poll, so the step under way finishes (void) instead of spinning for ever.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import torch

from elastic.distributed.group import StatelessGroup
from elastic.distributed.host_exchange import on_one_host
from elastic.kernels import ep_p2p
from elastic.layers.moe import FusedMoE, Routing
from elastic.layers.unreduced import UnreducedRows

if TYPE_CHECKING:
    from elastic.kernels.moe_triton import Alignment

logger = logging.getLogger(__name__)

_ALIGN = 256
# An exchange holds up to this many bytes per rank (tokens and combine regions): prefill steps up to that
# size take the exchange too; larger ones take NCCL. It never holds fewer than _MIN_CAPACITY tokens per
# rank (every decode batch a CUDA graph replays).
_BUDGET_BYTES = 512 * 2**20
_MIN_CAPACITY = 512


@dataclass(frozen=True)
class ExchangeShape:
    world: int
    capacity: int  # tokens per rank
    hidden_size: int
    top_k: int
    dtype: torch.dtype

    @classmethod
    def of(cls, moe: FusedMoE, world: int, capacity: int) -> ExchangeShape:
        """The exchange a model's MoE layers need (every layer has the same hidden size, top-k and dtype)."""
        return cls.sized(world, capacity, moe.hidden_size, moe.top_k, moe.w13.dtype)

    @classmethod
    def sized(cls, world: int, capacity: int, hidden_size: int, top_k: int, dtype: torch.dtype) -> ExchangeShape:
        """An exchange for steps of up to `capacity` tokens per rank, within _BUDGET_BYTES (the same on every
        rank)."""
        row_bytes = world * (2 * hidden_size * dtype.itemsize + top_k * 8)
        capacity = min(capacity, max(_MIN_CAPACITY, _BUDGET_BYTES // row_bytes))
        return cls(world, capacity, hidden_size, top_k, dtype)

    def regions(self) -> dict[str, tuple[int, tuple[int, ...], torch.dtype]]:
        """name -> (byte offset, shape, dtype) inside one rank's buffer."""
        rows, ll_rows = self.world * self.capacity, self.world * ep_p2p.LL_MAX_ROWS
        words = self.hidden_size * self.dtype.itemsize // 4  # the low-latency regions: 4 data bytes a word
        shapes = {"tokens": ((rows, self.hidden_size), self.dtype), "weights": ((rows, self.top_k), torch.float32),
                  "ids": ((rows, self.top_k), torch.int32), "combine": ((rows, self.hidden_size), self.dtype),
                  "ll_tokens": ((ll_rows, words), torch.int64), "ll_ids": ((ll_rows, self.top_k), torch.int64),
                  "ll_weights": ((ll_rows, self.top_k), torch.int64), "ll_combine": ((ll_rows, words), torch.int64),
                  "pad": ((self.world,), torch.int64)}
        out, offset = {}, 0
        for name, (shape, dtype) in shapes.items():
            out[name] = (offset, shape, dtype)
            nbytes = dtype.itemsize
            for n in shape:
                nbytes *= n
            offset += -(-nbytes // _ALIGN) * _ALIGN
        return out

    @property
    def nbytes(self) -> int:
        offset, shape, dtype = self.regions()["pad"]
        return offset + shape[0] * dtype.itemsize


class PeerExchange:
    def __init__(self, shape: ExchangeShape, rank: int, buffer: torch.Tensor, peer_addresses: list[int]) -> None:
        """`buffer`: this rank's (uint8, zeroed, at least shape.nbytes); `peer_addresses`: every rank's buffer
        as mapped into this process, in rank order."""
        self.shape, self.rank = shape, rank
        self.world, self.capacity = shape.world, shape.capacity
        device = buffer.device
        self.buffer = buffer
        self.peer_storages: list[torch.UntypedStorage] = []  # the other ranks' buffers mapped here (over_group)
        tables, views = {}, {}
        for name, (offset, dims, dtype) in shape.regions().items():
            tables[name] = torch.tensor([a + offset for a in peer_addresses], dtype=torch.int64, device=device)
            numel = 1
            for n in dims:
                numel *= n
            views[name] = buffer[offset:offset + numel * dtype.itemsize].view(dtype).view(dims)
        self.tables, self.views = tables, views
        self.local_tables = {name: t[rank].repeat(self.world) for name, t in tables.items()}
        self.ll_tables = ep_p2p.LowLatencyTables(tables["ll_tokens"], tables["ll_ids"], tables["ll_weights"],
                                                 tables["ll_combine"])
        self.combine = views["combine"]
        self.sequence = torch.zeros(1, dtype=torch.int64, device=device)  # exchanges passed (device counter)
        self.abort_flag = torch.zeros(1, dtype=torch.int32, device=device)
        self.arrivals = torch.zeros(1, dtype=torch.int32, device=device)  # CTAs done in the kernel under way
        self.device_barrier = ep_p2p.Barrier(tables["pad"], self.sequence, self.arrivals, self.abort_flag)
        # Made now: abort() runs while the device may be waiting, and must not allocate pinned memory or create
        # the device's first side stream then (on 2 x H200, a first torch.cuda.Stream() while a barrier spun
        # never returned, holding the GIL).
        self._one = torch.ones(1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._abort_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @classmethod
    def local_only(cls, shape: ExchangeShape, rank: int, device: torch.device) -> PeerExchange:
        """No peer mapped (every table entry is this rank's own buffer): what a standby engine compiles the
        kernels with before it has peers (warm-ups only, `local=True`)."""
        buffer = torch.zeros(shape.nbytes, dtype=torch.uint8, device=device)
        return cls(shape, rank, buffer, [buffer.data_ptr()] * shape.world)

    @classmethod
    def over_group(cls, group: StatelessGroup, shape: ExchangeShape) -> PeerExchange | None:
        """Allocate this rank's buffer and map every other rank's (a collective of the whole group): CUDA IPC
        handles travel through the group's store as msgpack (bytes and ints only). None on every rank if any
        rank cannot share or map (an allocator without IPC, GPUs without peer access): they fall back alike.
        No NCCL collective, so it may come before the group's communicator exists; but it allocates, syncs and
        maps CUDA IPC handles: only on the thread that runs the collectives (see engine/staging.py)."""
        device = group.device if group.device.index is not None else torch.device("cuda", torch.cuda.current_device())
        buffer = torch.zeros(shape.nbytes, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)
        try:  # (device, handle, size, offset, ref-counter handle, ref-counter offset, event handle, event sync)
            share: list | None = list(buffer.untyped_storage()._share_cuda_())
        except RuntimeError as e:
            logger.warning("%s: cannot share the p2p exchange buffer (%s)", group, e)
            share = None
        shares = [msgspec.msgpack.decode(s) for s in group.gather_via_store("p2p-ipc", msgspec.msgpack.encode(share))]
        if any(s is None for s in shares):
            return None
        addresses, peers = [], []
        try:
            for r, (_, *handle) in enumerate(shares):
                if r == group.rank:
                    addresses.append(buffer.data_ptr())
                    continue
                storage = torch.UntypedStorage._new_shared_cuda(device.index, *handle)  # mapped on this GPU
                peers.append(storage)
                addresses.append(storage.data_ptr())
        except RuntimeError as e:
            logger.warning("%s: cannot map a peer's p2p exchange buffer (%s)", group, e)
            addresses = []
        if b"0" in group.gather_via_store("p2p-mapped", b"1" if addresses else b"0"):
            return None  # some rank could not map every buffer: all fall back alike
        exchange = cls(shape, group.rank, buffer, addresses)
        exchange.peer_storages = peers
        group.on_abort.append(exchange.abort)
        # The gather above was the barrier: every buffer is mapped, and was zeroed (synchronized) before it
        # was shared, before any rank writes into another's.
        return exchange

    @staticmethod
    def supported(group: StatelessGroup) -> bool:
        """Whether every rank of `group` is a CUDA device of this host (decided alike on every rank: a
        collective over the group's store)."""
        return group.device.type == "cuda" and on_one_host(group)

    # ---- one MoE layer --------------------------------------------------------------------------------------
    def dispatch(self, hidden: torch.Tensor, routing: Routing, rows: int, slots_per_rank: int, local: bool = False,
                 aligned: Alignment | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's tokens to every rank, then the barrier (one kernel, which also routes them when `routing`
        holds the router's inputs); -> every rank's rows here: (hidden [W*rows, H], weights [W*rows, K] f32,
        ids [W*rows, K] int32: this rank's slot index, -1 for none), all contiguous. Global slot ids: rank d
        holds [d * slots_per_rank, (d + 1) * ...). `local`: a CUDA-graph warm-up (the same kernel, compiled
        for these shapes, writes this rank's buffers only and waits for no one). `aligned`: empty buffers the
        same kernel fills with the alignment of the ids it returns (FusedMoE.pairs_alignment)."""
        tables = self.local_tables if local else self.tables
        n = self.world * rows
        if rows <= ep_p2p.LL_MAX_ROWS:  # a few rows: flagged words, no barrier (ep_ll_triton.py)
            plain = (self.views["tokens"], self.views["ids"], self.views["weights"])
            ep_p2p.p2p_ll_dispatch(hidden, routing.physical, routing.weights, plain, self.ll_tables,
                                   self.device_barrier, rows, self.rank, slots_per_rank, sync=not local,
                                   router=routing.router, aligned=aligned)
            return self.views["tokens"][:n], self.views["weights"][:n], self.views["ids"][:n]
        ep_p2p.p2p_dispatch(hidden, routing.physical, routing.weights,
                            (tables["tokens"], tables["weights"], tables["ids"]), self.device_barrier, rows,
                            self.rank, slots_per_rank, sync=not local, router=routing.router,
                            aligned=(self.views["ids"][:n], aligned) if aligned is not None else None)
        return self.views["tokens"][:n], self.views["weights"][:n], self.views["ids"][:n]

    def combine_into(self, partial: torch.Tensor, num_tokens: int, rows: int, local: bool = False,
                     pair_ids: torch.Tensor | None = None, unreduced: bool = False) -> torch.Tensor | UnreducedRows:
        """partial [W*rows, H] (this rank's experts' share for every rank's rows) -> this rank's [T, H] sums.
        With pair_ids (the dispatch's ids [W*rows, K]), partial is [W*rows*K, H], one row per (row, k) pair,
        summed as it is sent (the experts' own sum kernel left out). `unreduced`: -> the W blocks of this
        rank's combine buffer as they are, for the next norm to sum (no reduce kernel)."""
        tables = self.local_tables if local else self.tables
        if rows <= ep_p2p.LL_MAX_ROWS:
            ep_p2p.p2p_ll_push(partial, self.combine, self.ll_tables, self.device_barrier, rows, self.rank,
                               sync=not local, pair_ids=pair_ids)
        else:
            ep_p2p.p2p_combine_push(partial, tables["combine"], self.combine.dtype, self.device_barrier, rows,
                                    self.rank, sync=not local, pair_ids=pair_ids)

        def reduce() -> torch.Tensor:
            return ep_p2p.p2p_combine_reduce(self.combine, num_tokens, rows, self.world)

        if unreduced:
            return UnreducedRows(self.combine[:self.world * rows].view(self.world, rows, -1), num_tokens, reduce)
        return reduce()

    def abort(self) -> None:
        """Release this rank's barriers now and for good (a peer died; another thread calls this while the
        engine's thread may be waiting on the device). A copy engine sets the flag, not a kernel: the
        waiting kernel may hold the stream, never the copy engines."""
        stream = self._abort_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            self.abort_flag.copy_(self._one, non_blocking=True)
        if stream is not None:
            stream.synchronize()

