"""Which data-parallel sizes a scale may ask for (anything else is a 400, before anything starts)."""
from __future__ import annotations

from elastic.config import EngineConfig
from elastic.elastic_ep.operation import ScaleError


def max_size(config: EngineConfig, visible_gpus: int | None) -> int | None:
    """The largest size: the option if set, else (CUDA) the GPUs from the first device on; None: no limit."""
    if config.parallel.max_data_parallel_size is not None:
        return config.parallel.max_data_parallel_size
    device = config.device
    if not device.startswith("cuda") or visible_gpus is None:
        return None
    first = int(device.split(":")[1]) if ":" in device else 0
    return max(visible_gpus - first, 1)


def expert_bytes(config: EngineConfig) -> int:
    """One expert slot's weights (gate+up and down projections)."""
    arch = config.model.arch
    element = {"float32": 4}.get(str(config.model.dtype).removeprefix("torch."), 2)
    return 3 * arch.hidden_size * arch.moe_intermediate_size * element


def check_target(config: EngineConfig, current: int, target: object, visible_gpus: int | None = None,
                 free_bytes: int | None = None) -> int:
    """The target size, validated; raises ScaleError(400). `free_bytes`: the least device memory any
    surviving rank has free (None: unknown, e.g. on CPU), against which a shrink's extra expert slots
    per rank are checked."""
    if isinstance(target, bool) or not isinstance(target, int):
        raise ScaleError(400, f"new_data_parallel_size must be an integer, got {target!r}")
    if target < 1:
        raise ScaleError(400, f"new_data_parallel_size must be at least 1, got {target}")
    limit = max_size(config, visible_gpus)
    if limit is not None and target > limit:
        raise ScaleError(400, f"new_data_parallel_size={target} exceeds the devices: at most {limit} rank(s) "
                              "(one GPU each; see --max-data-parallel-size)")
    if target < current and free_bytes is not None:
        arch, redundant = config.model.arch, config.parallel.num_redundant_experts
        old_slots = -(-(arch.num_experts + redundant) // current)
        extra_slots = -(-(arch.num_experts + redundant) // target) - old_slots
        # Layer by layer the new slot tensors are allocated before the old ones go: one layer's old slots
        # are held twice at the peak.
        need = (extra_slots * max(1, sum(arch.sparse_layers)) + old_slots) * expert_bytes(config)
        if need > free_bytes:
            raise ScaleError(400, f"{target} rank(s) cannot hold the model: each would need {need / 2**30:.1f} GiB "
                                  f"more for expert slots, {free_bytes / 2**30:.1f} GiB is free")
    return target
