"""This rank's process groups: DP control (gloo, CPU) for lockstep, EP data for expert parallelism."""
from __future__ import annotations

import torch

from elastic.config import ParallelConfig
from elastic.distributed.group import StatelessGroup, create_store


class ParallelState:
    def __init__(self, config: ParallelConfig, device: torch.device, generation: int = 0) -> None:
        self.rank, self.world_size = config.data_parallel_rank, config.data_parallel_size
        self.store = create_store(config.store_host, config.store_port, is_master=False)
        host = config.store_host
        self.dp = StatelessGroup(self.store, f"dp/{generation}", self.rank, self.world_size, "gloo", host=host)
        backend = "nccl" if device.type == "cuda" else "gloo"
        self.ep = StatelessGroup(self.store, f"ep/{generation}", self.rank, self.world_size, backend, device,
                                 host=host)

    def exchange_step(self, num_tokens: int, has_work: bool, decode_only: bool) -> tuple[list[int], bool, bool]:
        """Every rank's token count for this step, whether any rank still has work (the 'anyone
        unfinished?' all-reduce of a request wave, done every step since it is one small CPU collective
        that also sizes the step), and whether every rank runs decode only (then all replay CUDA graphs)."""
        mine = torch.tensor([[num_tokens, int(has_work), int(decode_only)]], dtype=torch.long)
        everyone = self.dp.all_gather(mine)  # [W, 3]
        return everyone[:, 0].tolist(), bool(everyone[:, 1].any()), bool(everyone[:, 2].all())

    def destroy(self) -> None:
        self.ep.destroy()
        self.dp.destroy()
