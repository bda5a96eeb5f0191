"""DeepSeek's published EPLB greedy, re-implemented from its description, as the baseline for tests and benchmarks.

Algorithm (deepseek-ai/EPLB, eplb.py): give every expert one slot, then each extra slot to the expert with the
highest load per replica; pack the replicas largest-first into the lightest GPU that still has a free slot
("balanced packing", a fixed number of slots per GPU). The hierarchical variant (num_groups % num_nodes == 0)
first packs expert groups onto nodes the same way, then replicates and packs within each node. It ignores the
placement in force, so a rebalance may rewrite nearly every slot. Same contract as
`elastic.eplb.rebalance_experts` (without `current`), so the two compare directly.
"""
from __future__ import annotations

import heapq

import numpy as np
import torch

from elastic.eplb.policy import build_maps, check_args  # one copy of the argument checks and map building


def greedy_replicate(load: np.ndarray, num_slots: int) -> np.ndarray:
    """[E] load -> [num_slots] logical expert per replica: the E originals first, then extras in creation order."""
    num_experts = load.shape[0]
    count = np.ones(num_experts, dtype=np.int64)
    # Max-heap on load per replica; ties go to the lowest expert id (like argmax).
    heap = [(-float(load[e]), e) for e in range(num_experts)]
    heapq.heapify(heap)
    extras = []
    for _ in range(num_slots - num_experts):
        _, e = heapq.heappop(heap)
        count[e] += 1
        extras.append(e)
        heapq.heappush(heap, (-float(load[e]) / count[e], e))
    return np.concatenate([np.arange(num_experts), np.asarray(extras, dtype=np.int64)])


def balanced_packing(item_load: np.ndarray, num_packs: int) -> np.ndarray:
    """[n] item loads -> [n] pack index; n/num_packs items per pack, largest item first into the lightest open pack."""
    per_pack = item_load.shape[0] // num_packs
    pack = np.empty(item_load.shape[0], dtype=np.int64)
    open_packs = [(0.0, p) for p in range(num_packs)]  # (load, pack id): ties go to the lowest pack id
    filled = [0] * num_packs
    for item in np.argsort(-item_load, kind="stable"):
        load, p = heapq.heappop(open_packs)
        pack[item] = p
        filled[p] += 1
        if filled[p] < per_pack:
            heapq.heappush(open_packs, (load + float(item_load[item]), p))
    return pack


def _place_flat(load: np.ndarray, num_slots: int, num_gpus: int) -> np.ndarray:
    """[E] load -> [num_slots] phy2log: greedy replication + balanced packing onto GPUs of num_slots/num_gpus slots."""
    replica_expert = greedy_replicate(load, num_slots)
    count = np.bincount(replica_expert, minlength=load.shape[0])
    gpu = balanced_packing(load[replica_expert] / count[replica_expert], num_gpus)
    # Stable sort by GPU: slot order inside a GPU follows replica order.
    return replica_expert[np.argsort(gpu, kind="stable")]


def _place_layer(load: np.ndarray, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """[E] -> [S] phy2log for one layer; num_nodes == 1 is the global policy."""
    if num_nodes == 1:
        return _place_flat(load, num_slots, num_gpus)
    num_experts = load.shape[0]
    group_size, groups_per_node = num_experts // num_groups, num_groups // num_nodes
    group_node = balanced_packing(load.reshape(num_groups, group_size).sum(1), num_nodes)
    out = []
    for node in range(num_nodes):
        groups = np.flatnonzero(group_node == node)
        assert groups.shape[0] == groups_per_node
        experts = (groups[:, None] * group_size + np.arange(group_size)).ravel()  # node-local -> global id
        out.append(experts[_place_flat(load[experts], num_slots // num_nodes, num_gpus // num_nodes)])
    return np.concatenate(out)


def rebalance_experts_reference(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                                num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [L, E] -> (phy2log [L, S], log2phy [L, E, R] -1 padded, logcnt [L, E]), DeepSeek's greedy."""
    load = check_args(weight, num_replicas, num_groups, num_nodes, num_gpus)
    num_experts = load.shape[1]
    hierarchical = num_experts % num_groups == 0 and num_groups % num_nodes == 0
    nodes = num_nodes if hierarchical else 1
    phy2log = np.stack([_place_layer(row, num_replicas, num_groups, nodes, num_gpus) for row in load])
    return build_maps(phy2log, num_experts)
