"""This rank's process groups: DP control (gloo, CPU) for lockstep, EP data for expert parallelism.

Built for one `ParallelLayout` (epoch, world size, rank). Elastic scaling builds the groups of the next
layout beside the live ones (in a background thread, while this rank serves), then swaps them in at an
agreed step; a single engine has a layout but no groups.
"""
from __future__ import annotations

import datetime

import torch

from elastic.distributed.group import DEFAULT_TIMEOUT, StatelessGroup, create_store
from elastic.distributed.host_exchange import SharedMemoryAllGather, on_one_host, shared_memory_usable
from elastic.protocol.scaling import ParallelLayout

__all__ = ["ParallelLayout", "ParallelState"]


class ParallelState:
    def __init__(self, layout: ParallelLayout, device: torch.device,
                 timeout: datetime.timedelta = DEFAULT_TIMEOUT,
                 rendezvous_timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> None:
        """`rendezvous_timeout`: how long to wait for every rank to arrive (a scale-up's deadline: a new
        rank that never comes must not keep the others waiting); `timeout`: each collective's."""
        if not layout.is_distributed:
            raise ValueError("a single rank has no process groups")
        self.layout = layout
        self.rank, self.world_size = layout.rank, layout.world_size
        host = layout.store_host
        self.store = create_store(host, layout.store_port, is_master=False, timeout=rendezvous_timeout)
        self.dp = StatelessGroup(self.store, f"dp/{layout.epoch}", self.rank, self.world_size, "gloo", host=host,
                                 timeout=timeout)
        backend = "nccl" if device.type == "cuda" else "gloo"
        self.ep = StatelessGroup(self.store, f"ep/{layout.epoch}", self.rank, self.world_size, backend, device,
                                 host=host, timeout=timeout)
        # The per-step exchange through shared memory where every rank is a GPU of this host (microseconds
        # instead of a TCP round trip per step); gloo elsewhere.
        self.host_exchange: SharedMemoryAllGather | None = None
        if device.type == "cuda" and shared_memory_usable() and on_one_host(self.dp):
            self.host_exchange = SharedMemoryAllGather(self.dp, width=6)
        # Whether every rank was ready to commit a prepared scale at the last exchange (elastic scaling).
        self.all_scale_ready = False

    def exchange_step(self, num_tokens: int, has_work: bool, decode_only: bool,
                      eplb_due: bool = False, scale_ready: bool = False,
                      eplb_plan_ready: bool = False) -> tuple[list[int], bool, bool, bool]:
        """Every rank's token count for this step, whether any rank still has work (the 'anyone
        unfinished?' all-reduce of a request wave, done every step since it is one small CPU collective
        that also sizes the step), whether every rank runs decode only (then all replay CUDA graphs), and
        whether any rank wants an expert rebalance to start now (then all start it at this step). Also,
        kept in `all_scale_ready`: whether every rank has been told to commit a prepared scale, so that
        all of them switch layouts after this same step; and in `all_eplb_plan_ready`, whether every rank's
        background expert placement is computed (then all start moving experts after this step)."""
        mine = [num_tokens, int(has_work), int(decode_only), int(eplb_due), int(scale_ready), int(eplb_plan_ready)]
        if self.host_exchange is not None:
            everyone = torch.from_numpy(self.host_exchange.all_gather(mine))  # [W, 6]
        else:
            everyone = self.dp.all_gather(torch.tensor([mine], dtype=torch.long))
        self.all_scale_ready = bool(everyone[:, 4].all())
        self.all_eplb_plan_ready = bool(everyone[:, 5].all())
        return (everyone[:, 0].tolist(), bool(everyone[:, 1].any()), bool(everyone[:, 2].all()),
                bool(everyone[:, 3].any()))

    def destroy(self) -> None:
        if self.host_exchange is not None:
            self.host_exchange.close()
        self.ep.destroy()
        self.dp.destroy()
