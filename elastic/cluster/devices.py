"""The devices this host's launcher may start ranks on, and so the largest data-parallel size."""
from __future__ import annotations

import itertools

from elastic.config import EngineConfig


def ranks_all_local(config: EngineConfig) -> bool:
    """Whether this host's launcher starts every rank as its own process (no Ray, no other nodes)."""
    p = config.parallel
    return p.data_parallel_backend != "ray" and not p.local_load_balancing \
        and p.local_ranks == range(p.data_parallel_size)


def visible_gpus(config: EngineConfig) -> int | None:
    """GPUs this host offers its ranks; None where ranks are placed beyond it (Ray, other nodes) or on CPU."""
    if not config.device.startswith("cuda") or not ranks_all_local(config):
        return None
    import torch

    return torch.cuda.device_count()


def device_index(device: str) -> int:
    """'cuda:3' -> 3; 'cuda' -> 0."""
    return int(device.split(":")[1]) if ":" in device else 0


def first_gpu(config: EngineConfig) -> int:
    return device_index(config.device)


def max_size(config: EngineConfig, visible: int | None) -> int | None:
    """The largest size: the option if set, else (CUDA) the GPUs from the first device on; None: no limit."""
    if config.parallel.max_data_parallel_size is not None:
        return config.parallel.max_data_parallel_size
    if not config.device.startswith("cuda") or visible is None:
        return None
    return max(visible - first_gpu(config), 1)


def rank_device(device: str, rank: int, world: int) -> str:
    """One GPU per DP rank: engine i uses cuda:i (cuda:N+i when a first device N is given)."""
    if world == 1 or not device.startswith("cuda"):
        return device
    return f"cuda:{device_index(device) + rank}"


def pick_device(device: str, rank: int, world: int, taken: set[str]) -> str:
    """The rank's GPU (`rank_device`), or the lowest one from the first device on that no live engine of
    this host holds: after a rank dies, the survivors keep their GPUs under new rank numbers, so a
    replacement must not land on a survivor's GPU by its rank."""
    preferred = rank_device(device, rank, world)
    if not preferred.startswith("cuda:") or preferred not in taken:
        return preferred
    taken_indices = {device_index(d) for d in taken if d.startswith("cuda")}
    return f"cuda:{next(i for i in itertools.count(device_index(device)) if i not in taken_indices)}"
