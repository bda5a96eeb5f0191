"""A standby engine's head start: what an engine a scale-up starts can do before it is asked to join.

The launcher keeps engine processes started on spare GPUs (cluster/standby.py). Each one, before it says
HELLO, imports everything, creates its CUDA context, builds the model (random weights: a joining rank
receives the real ones from the serving ranks) for the layout it will most likely join, measures its KV
capacity there, and compiles every kernel that layout's decode graphs launch (the compiled kernels also land
in the on-disk cache, where the serving ranks' staging finds them). When a scale-up claims it for that
layout, the join starts at the group rendezvous; for another layout it rebuilds the model first.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from elastic.config import EngineConfig
from elastic.distributed.expert_parallel import ExpertParallelComm
from elastic.distributed.peer_exchange import ExchangeShape, PeerExchange
from elastic.engine.phase_clock import PhaseClock
from elastic.executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def layout_key(config: EngineConfig) -> tuple:
    """What the model's construction depends on: which expert slots this rank holds, and how it reaches
    the others (the compiled kernels)."""
    p = config.parallel
    return p.data_parallel_size, p.data_parallel_rank, p.num_redundant_experts, p.ep_dispatch


@dataclass
class Prewarmed:
    runner: ModelRunner | None
    num_blocks: int  # the KV blocks this rank could hold in that layout
    key: tuple

    def fits(self, config: EngineConfig) -> bool:
        return self.runner is not None and layout_key(config) == self.key

    def take(self) -> ModelRunner:
        runner, self.runner = self.runner, None
        assert runner is not None
        return runner

    def release(self) -> None:
        """Claimed for another layout: free the model before the right one is built."""
        device = self.runner.device if self.runner is not None else None
        self.runner = None
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class _StandInGroup:
    """What the expert-parallel warm-up path reads of a group (a standby has no peers yet)."""
    world_size: int
    rank: int
    device: torch.device


def prewarm(config: EngineConfig) -> Prewarmed:
    """Model (random weights), KV sizing and the decode graphs' kernels for `config.parallel`'s layout."""
    clock = PhaseClock()
    runner = ModelRunner(dataclasses.replace(config, model=dataclasses.replace(config.model, load_format="dummy")))
    runner.config = config
    clock.mark("model")
    num_blocks = runner.determine_num_blocks()
    clock.mark("kv sizing")
    _compile_decode_kernels(runner)
    runner.warm_up_moe_kernels()  # (no collectives: a claimed standby joins with them compiled)
    clock.mark("kernels")
    p = config.parallel
    logger.info("standby: prewarmed for rank %d of %d in %.1fs (%s)", p.data_parallel_rank, p.data_parallel_size,
                clock.total_s, clock.summary())
    return Prewarmed(runner, num_blocks, layout_key(config))


def _compile_decode_kernels(runner: ModelRunner) -> None:
    """The decode graphs' warm-ups over a two-block KV cache, with stand-in expert-parallel collectives
    (CUDA only: elsewhere nothing is compiled ahead)."""
    p = runner.config.parallel
    if runner.device.type != "cuda":
        return
    moe = runner.model.moe_layers()
    comm = None
    if p.is_distributed and moe:
        group = _StandInGroup(p.data_parallel_size, p.data_parallel_rank, runner.device)
        exchange = None
        if p.ep_dispatch == "p2p":
            shape = ExchangeShape.of(moe[0], p.data_parallel_size, runner.config.scheduler.max_step_tokens)
            exchange = PeerExchange.local_only(shape, p.data_parallel_rank, runner.device)
        comm = ExpertParallelComm(group, p.ep_dispatch, exchange)  # type: ignore[arg-type]
    for layer in moe:
        layer.live.ep_comm = comm
    runner.allocate_kv_cache(2)
    try:
        runner.warm_up_step_graphs()
    finally:
        for layer in moe:
            layer.live.ep_comm = None
        runner.allocate_kv_cache(0)
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
