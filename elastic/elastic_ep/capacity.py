"""Which data-parallel sizes a scale may ask for (anything else is a 400, before anything starts)."""
from __future__ import annotations

from elastic.cluster.devices import max_size
from elastic.config import EngineConfig
from elastic.elastic_ep.operation import ScaleError


def expert_bytes(config: EngineConfig) -> int:
    """One expert slot's weights (gate+up and down projections)."""
    arch = config.model.arch
    element = {"float32": 4}.get(str(config.model.dtype).removeprefix("torch."), 2)
    return 3 * arch.hidden_size * arch.moe_intermediate_size * element


def check_target(config: EngineConfig, current: int, target: object, visible_gpus: int | None = None,
                 survivors: list[tuple[int | None, int | None]] | None = None) -> int:
    """The target size, validated; raises ScaleError(400). `survivors`: (free device bytes, expert slot
    capacity) of the serving ranks in rank order (None where unknown, e.g. on CPU): a shrink gives the
    ranks that stay more slots per rank, staged beside the live ones, so a rank whose storage is too small
    needs the whole new set of slots free until the switch."""
    if isinstance(target, bool) or not isinstance(target, int):
        raise ScaleError(400, f"new_data_parallel_size must be an integer, got {target!r}")
    if target < 1:
        raise ScaleError(400, f"new_data_parallel_size must be at least 1, got {target}")
    limit = max_size(config, visible_gpus)
    if limit is not None and target > limit:
        raise ScaleError(400, f"new_data_parallel_size={target} exceeds the devices: at most {limit} rank(s) "
                              "(one GPU each; see --max-data-parallel-size)")
    if target < current:
        for rank, (free, capacity) in enumerate((survivors or [])[:target]):
            need = staging_bytes(config, target, capacity)
            if free is not None and need > free:
                raise ScaleError(400, f"{target} rank(s) cannot hold the model: rank {rank} would need "
                                      f"{need / 2**30:.1f} GiB more for expert slots and the exchange, "
                                      f"{free / 2**30:.1f} GiB is free")
    return target


def staging_bytes(config: EngineConfig, size: int, capacity: int | None) -> int:
    """Device memory a rank needs to stage its expert slots at `size` ranks, holding `capacity` slots now, and
    the peer-to-peer exchange of that layout (built beside the live one until the switch)."""
    arch = config.model.arch
    slots = -(-(arch.num_experts + config.parallel.num_redundant_experts) // size)
    need = exchange_bytes(config, size)
    if capacity is not None and capacity >= slots:
        return need  # the slots fit the storage it has (a rank that served at a smaller size keeps it)
    return need + slots * max(1, sum(arch.sparse_layers)) * expert_bytes(config)


def exchange_bytes(config: EngineConfig, size: int) -> int:
    """One rank's p2p exchange buffer at `size` ranks (0 without one), as the engines size it."""
    if size < 2 or config.parallel.ep_dispatch != "p2p" or not config.device.startswith("cuda"):
        return 0
    from elastic.distributed.peer_exchange import ExchangeShape  # (torch and the kernels: only where p2p runs)

    arch = config.model.arch
    return ExchangeShape.sized(size, config.scheduler.max_step_tokens, arch.hidden_size, arch.top_k,
                               config.model.dtype).nbytes
