"""Expert parallelism as a transform: each FusedMoE layer's experts are spread over the EP group, and
tokens reach the ranks holding their experts by one of two exact paths:

- all-to-all: each (token, k) pair goes to the rank owning its physical slot (variable split sizes),
  the owner applies the expert and the routing weight, results come back and are summed per token;
- all-gather / reduce-scatter: every rank sees every rank's tokens (padded to the step's largest
  rank), computes its own slots' contributions, and a reduce-scatter sums them back to the owners.
  Fixed shapes per step, so it stays capturable in a CUDA graph.
- peer-to-peer ("p2p"): the all-gather's data flow through buffers every rank maps (NVLink, see
  peer_exchange.py) with device-side barriers: decode steps of up to `capacity` tokens per rank; larger steps
  (prefill) take the all-gather path over NCCL. Ranks on several hosts take the all-gather path throughout.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from elastic.distributed.group import StatelessGroup
from elastic.distributed.peer_exchange import ExchangeShape, PeerExchange
from elastic.forward_context import get_forward_context
from elastic.layers.moe import ExpertSlots, FusedMoE, Routing
from elastic.layers.unreduced import UnreducedRows

logger = logging.getLogger(__name__)


class ExpertParallelComm:
    def __init__(self, group: StatelessGroup, mode: str, exchange: PeerExchange | None = None) -> None:
        if mode not in ("alltoall", "allgather", "p2p"):
            raise ValueError(f"unknown expert-parallel dispatch mode {mode!r}")
        self.group, self.mode, self.exchange = group, mode, exchange

    def __call__(self, moe: FusedMoE, slots: ExpertSlots, hidden: torch.Tensor, routing: Routing,
                 unreduced: bool = False) -> torch.Tensor | UnreducedRows:
        """`unreduced`: the caller takes the p2p exchange's per-rank blocks unsummed (see UnreducedRows)."""
        ctx = get_forward_context()
        sizes = ctx.dp_num_tokens
        if (self.mode != "alltoall" and self.exchange is not None and sizes is not None
                and max(sizes) <= self.exchange.capacity):
            return self._p2p(moe, slots, hidden, routing, max(sizes), ctx.stand_in_collectives, unreduced)
        weights, physical = routing.resolve()
        if self.mode == "alltoall":
            return self._alltoall(moe, slots, hidden, weights, physical)
        return self._allgather(moe, slots, hidden, weights, physical)

    def _p2p(self, moe: FusedMoE, slots: ExpertSlots, hidden: torch.Tensor, routing: Routing, rows: int,
             local: bool, unreduced: bool = False) -> torch.Tensor | UnreducedRows:
        # hidden [T, H] -> every rank's rows [W * rows, H] here -> this rank's experts -> summed back [T, H].
        # `local`: a CUDA-graph warm-up runs the same kernels on this rank's own buffers only. The dispatch
        # writes each rank's own slot indices (int32, rank r's slots start at r * slots_per_rank), so the
        # experts take them as they are; the push sums each row's (row, k) pairs as it sends them. Decode steps:
        # dispatch (routing and the experts' alignment inside), up, down, push, and the sum in the next norm.
        assert slots.first_slot == self.exchange.rank * slots.slots_per_rank, "EP rank != the exchange's rank"
        aligned = moe.pairs_alignment(slots, self.exchange.world * rows)  # filled by the dispatch kernel
        all_hidden, all_weights, all_ids = self.exchange.dispatch(hidden, routing, rows, slots.slots_per_rank, local,
                                                                  aligned)
        pairs = moe.compute_local_pairs(slots, all_hidden, all_weights, all_ids, aligned)  # [W*rows*K, H] | None
        if pairs is not None:
            return self.exchange.combine_into(pairs, hidden.shape[0], rows, local, pair_ids=all_ids,
                                              unreduced=unreduced)
        partial = moe.compute_local_ids(slots, all_hidden, all_weights, all_ids)  # [W * rows, H]
        return self.exchange.combine_into(partial, hidden.shape[0], rows, local, unreduced=unreduced)

    def _allgather(self, moe: FusedMoE, slots: ExpertSlots, hidden: torch.Tensor, weights: torch.Tensor,
                   physical: torch.Tensor) -> torch.Tensor:
        # hidden [T, H]; weights [T, K] f32; physical [T, K] global slot ids
        ctx = get_forward_context()
        sizes = ctx.dp_num_tokens
        if sizes is None:
            raise RuntimeError("allgather dispatch needs dp_num_tokens in the forward context")
        num_tokens, top_k = physical.shape
        pad = max(sizes) - num_tokens
        hidden_p = F.pad(hidden, (0, 0, 0, pad))  # [T_max, H]
        # Slot ids travel as float32 beside the weights: exact below 2**24 slots, one collective fewer.
        meta = F.pad(torch.cat([physical.float(), weights], dim=1), (0, 0, 0, pad), value=-1.0)  # [T_max, 2K]
        if ctx.stand_in_collectives:  # a CUDA-graph warm-up: same shapes and kernels, no other rank
            world = self.group.world_size
            all_hidden, all_meta = hidden_p.repeat(world, 1), meta.repeat(world, 1)
        else:
            all_hidden = self.group.all_gather(hidden_p)  # [W * T_max, H]
            all_meta = self.group.all_gather(meta)
        partial = moe.compute_local(slots, all_hidden, all_meta[:, top_k:], all_meta[:, :top_k].long())
        if ctx.stand_in_collectives:
            return partial[:num_tokens]
        return self.group.reduce_scatter(partial)[:num_tokens]

    def _alltoall(self, moe: FusedMoE, slots: ExpertSlots, hidden: torch.Tensor, weights: torch.Tensor,
                  physical: torch.Tensor) -> torch.Tensor:
        world, top_k = self.group.world_size, physical.shape[1]
        flat = physical.flatten()  # [P = T*K]
        dest = flat // slots.slots_per_rank  # owning rank of each pair
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=world)  # [W]
        recv_counts = self.group.all_to_all(send_counts, [1] * world, [1] * world)
        counts = torch.stack([send_counts, recv_counts]).tolist()  # the one host sync of this path
        send_splits, recv_splits = counts[0], counts[1]
        token_of_pair = order // top_k
        send_meta = torch.stack([flat[order].float(), weights.flatten()[order]], dim=1)  # [P, 2]
        recv_hidden = self.group.all_to_all(hidden[token_of_pair], send_splits, recv_splits)  # [R, H]
        recv_meta = self.group.all_to_all(send_meta, send_splits, recv_splits)  # [R, 2]
        expert_out = moe.compute_local(slots, recv_hidden, recv_meta[:, 1:], recv_meta[:, :1].long())  # [R, H]
        back = self.group.all_to_all(expert_out, recv_splits, send_splits)  # [P, H], in `order`
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        return out.index_add_(0, token_of_pair, back.float()).to(hidden.dtype)


def apply_expert_parallel(model: torch.nn.Module, group: StatelessGroup | None, mode: str,
                          staged: bool = False, p2p_capacity: int = 512) -> ExpertParallelComm | None:
    """Route every MoE layer of `model` through `group` (None: a single rank computes locally), for its live
    slots or, with `staged`, for the next layout's slots that elastic scaling is preparing. A collective of
    the group's store in "p2p" mode (the exchange buffers; `p2p_capacity`: tokens per rank they hold), with no
    NCCL collective. -> the layers' exchange (None without a group)."""
    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    comm = None
    if group is not None:
        exchange = None
        if mode == "p2p" and layers:
            if PeerExchange.supported(group):
                exchange = PeerExchange.over_group(group, ExchangeShape.of(layers[0], group.world_size, p2p_capacity))
            if exchange is None:
                logger.info("%s: no peer-to-peer exchange (ranks on several hosts, or no CUDA IPC / peer access); "
                            "expert-parallel exchange by all-gather over NCCL", group)
        comm = ExpertParallelComm(group, mode, exchange)
    for module in layers:
        slots = module.staged if staged else module.live
        assert slots is not None, "stage the layers' slots first"
        slots.ep_comm = comm
    return comm
