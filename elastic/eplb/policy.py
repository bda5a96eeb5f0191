"""EPLB placement policy: which logical expert each physical slot holds, balanced and with few weight moves.

Contract (same as DeepSeek's `rebalance_experts`, plus the placement in force):
    rebalance_experts(weight [L, E], S, num_groups, num_nodes, num_gpus, current [L, S] | None)
        -> phy2log [L, S], log2phy [L, E, R] (-1 padded), logcnt [L, E]
Slots s in [g*S/G, (g+1)*S/G) live on GPU g. A slot's load is its expert's load / the expert's replica count.
The search itself (per layer, from scratch or sticky to `current`, flat or hierarchical): solver.py.
"""
from __future__ import annotations

import numpy as np
import torch

from elastic.eplb.solver import solve_flat, solve_hierarchical


# ----------------------------------------------------------------------------------------------- contract
def check_args(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
               num_gpus: int) -> np.ndarray:
    """Validate the shared arguments; return the load as float64 numpy [L, E]."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [layers, experts], got {getattr(weight, 'shape', weight)}")
    load = weight.detach().cpu().double().numpy()
    num_experts = load.shape[1]
    if num_experts == 0 or not np.isfinite(load).all() or (load < 0).any():
        raise ValueError("weight must hold finite, non-negative loads for at least one expert")
    if min(num_groups, num_nodes, num_gpus) < 1:
        raise ValueError(f"num_groups={num_groups}, num_nodes={num_nodes}, num_gpus={num_gpus} must be >= 1")
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas={num_replicas} < {num_experts} experts: every expert needs a slot")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} does not split evenly over num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} is not a multiple of num_nodes={num_nodes}")
    return load


def _check_current(current: torch.Tensor | None, num_layers: int, num_slots: int,
                   num_experts: int) -> np.ndarray | None:
    """current phy2log [L, S] -> int64 numpy, or None; -1 marks a slot without a (valid) expert."""
    if current is None:
        return None
    cur = torch.as_tensor(current).detach().cpu().numpy().astype(np.int64)
    if cur.shape != (num_layers, num_slots):
        raise ValueError(f"current must be a phy2log tensor of shape ({num_layers}, {num_slots}), "
                         f"got {getattr(current, 'shape', current)}")
    if ((cur < -1) | (cur >= num_experts)).any():
        raise ValueError(f"current holds expert ids outside [0, {num_experts}) (-1 allowed for an empty slot)")
    return cur


def build_maps(phy2log: np.ndarray, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """phy2log [L, S] -> (phy2log, log2phy [L, E, R] with slots ascending and -1 padding, logcnt [L, E])."""
    num_layers, num_slots = phy2log.shape
    rows = np.arange(num_layers)[:, None]
    logcnt = np.zeros((num_layers, num_experts), dtype=np.int64)
    np.add.at(logcnt, (np.broadcast_to(rows, phy2log.shape), phy2log), 1)
    order = np.argsort(phy2log, axis=1, kind="stable")  # slots grouped by expert, ascending inside a group
    expert = np.take_along_axis(phy2log, order, axis=1)
    first = np.cumsum(logcnt, axis=1) - logcnt  # [L, E] position of each expert's first slot in `order`
    rank = np.arange(num_slots)[None, :] - first[rows, expert]
    log2phy = np.full((num_layers, num_experts, int(logcnt.max())), -1, dtype=np.int64)
    log2phy[np.broadcast_to(rows, expert.shape), expert, rank] = order
    return torch.from_numpy(phy2log.astype(np.int64)), torch.from_numpy(log2phy), torch.from_numpy(logcnt)


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      current: torch.Tensor | None = None, *,
                      slack: float = 0.03) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place weight [L, E] loads on num_replicas slots per layer -> (phy2log [L, S], log2phy [L, E, R], logcnt [L, E]).

    current: phy2log [L, S] in force; experts stay put while the max GPU load stays within (1 + slack) of
    the from-scratch placement's. Hierarchical when num_groups divides E and num_nodes divides num_groups.
    """
    load = check_args(weight, num_replicas, num_groups, num_nodes, num_gpus)
    num_layers, num_experts = load.shape
    cur = _check_current(current, num_layers, num_replicas, num_experts)
    hierarchical = num_experts % num_groups == 0 and num_groups % num_nodes == 0 and num_nodes > 1
    phy2log = np.empty((num_layers, num_replicas), dtype=np.int64)
    for layer in range(num_layers):
        layer_cur = None if cur is None else cur[layer]
        if hierarchical:
            phy2log[layer] = solve_hierarchical(load[layer], num_replicas, num_groups, num_nodes, num_gpus,
                                                 layer_cur, slack)
        else:
            phy2log[layer] = solve_flat(load[layer], num_replicas, num_gpus, layer_cur, slack)
    return build_maps(phy2log, num_experts)


# ------------------------------------------------------------------------------------------------ metrics
def _gpu_loads(load: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """load [L, E], phy2log [L, S] -> [L, G] tokens per GPU, an expert's tokens split evenly over its replicas."""
    num_layers, num_experts = load.shape
    rows = np.broadcast_to(np.arange(num_layers)[:, None], phy2log.shape)
    count = np.zeros((num_layers, num_experts))
    np.add.at(count, (rows, phy2log), 1.0)
    slot_load = load[rows, phy2log] / count[rows, phy2log]
    return slot_load.reshape(num_layers, num_gpus, -1).sum(-1)


def _as_numpy(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    load = torch.as_tensor(weight).detach().cpu().double().numpy()
    p2l = torch.as_tensor(phy2log).detach().cpu().numpy().astype(np.int64)
    if load.ndim != 2 or p2l.ndim != 2 or p2l.shape[0] != load.shape[0] or p2l.shape[1] % num_gpus:
        raise ValueError(f"weight [L, E] {tuple(load.shape)} and phy2log [L, S] {tuple(p2l.shape)} do not match "
                         f"(S must split over {num_gpus} GPUs)")
    if ((p2l < 0) | (p2l >= load.shape[1])).any():
        raise ValueError("phy2log holds expert ids outside [0, E)")
    return load, p2l


def balancedness(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> float:
    """Mean over layers of (mean GPU load / max GPU load) (vLLM's definition); 1.0 for a layer without load."""
    load, p2l = _as_numpy(weight, phy2log, num_gpus)
    gpu = _gpu_loads(load, p2l, num_gpus)
    peak = gpu.max(1)
    per_layer = np.where(peak > 0, gpu.mean(1) / np.where(peak > 0, peak, 1.0), 1.0)
    return float(per_layer.mean())


def count_moved_slots(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor) -> int:
    """Slots whose logical expert changes (each one is an expert's weights copied into that slot)."""
    old, new = torch.as_tensor(old_phy2log), torch.as_tensor(new_phy2log)
    if old.shape != new.shape:
        raise ValueError(f"placements differ in shape: {tuple(old.shape)} vs {tuple(new.shape)}")
    return int((old != new).sum())


def should_rebalance(weight: torch.Tensor, current_phy2log: torch.Tensor, new_phy2log: torch.Tensor,
                     num_gpus: int, min_gain: float = 0.01) -> bool:
    """Skip rule: apply new_phy2log only if it raises the balancedness under `weight` by >= min_gain (absolute)."""
    gain = balancedness(weight, new_phy2log, num_gpus) - balancedness(weight, current_phy2log, num_gpus)
    return gain >= min_gain
