"""EPLB placement search, one layer at a time (what policy.rebalance_experts runs).

Per layer:
1. From scratch: greedy replica counts (each extra slot to the expert with the highest load per replica),
   largest-first packing into the lightest GPU with a free slot -- DeepSeek's algorithm -- then local search
   on the most loaded GPU: the best swap of two slots or, when no swap helps, the best change of one slot's
   expert (a replica changes hands); then a few seeded random kicks of that kind, each followed by local
   search, kept if they lower the max. Only improvements are kept, so in the global policy the max GPU
   load never exceeds DeepSeek's.
2. With `current`: bound = min(best max load * (1 + slack), DeepSeek's max load on this load). Replica
   counts start from the current ones and move replicas towards hot experts only until no load per replica
   exceeds the greedy optimum by 20% (the scratch placement's counts as a second try). Every slot keeps its
   expert where the counts allow, new replicas go largest-first to the lightest GPU with a freed slot, then
   the same local search repairs GPUs above the bound, preferring the swap that adds the fewest moves.
   Nothing within the bound -> the scratch placement with GPUs relabelled to overlap the current one. A move
   is a slot whose logical expert changes; slots are matched within each GPU so a kept expert stays put.
Hierarchical (num_groups % num_nodes == 0, groups divide E, several nodes): groups are packed onto nodes the
same way (one "replica" per group, sticky to the node that holds most of the group now), then each node is
solved as above on its own slots and GPUs, with the busiest node's best max load as a shared floor.
"""
from __future__ import annotations

import heapq

import numpy as np

_REL_TOL = 1e-9  # a swap must lower the max by more than this fraction (float noise must not loop)
# With `current`, replica counts move towards the greedy ones only until no expert's load per replica exceeds
# the greedy optimum by more than this factor. Each count change is a rewritten slot, but stale counts (big
# replicas of a hot expert) cost balance once the load moves on. Benchmark (drift, next window): no cap lost
# up to 2% balancedness vs greedy; 1.05 / 1.2 cost ~0.3% / ~0.5% on average, 1.2 with a few % fewer moves.
_COUNT_CAP = 1.2
_KICKS = 4  # perturbation rounds after the local search from scratch (see _kicked)

# ------------------------------------------------------------------------------------------ replica counts
def greedy_counts(load: np.ndarray, num_slots: int) -> np.ndarray:
    """[E] -> [E] replica counts minimising the max load per replica: one each, extras to the hottest per replica."""
    count = np.ones(load.shape[0], dtype=np.int64)
    heap = [(-float(v), e) for e, v in enumerate(load)]  # ties to the lowest id, like DeepSeek's argmax
    heapq.heapify(heap)
    for _ in range(num_slots - load.shape[0]):
        _, e = heapq.heappop(heap)
        count[e] += 1
        heapq.heappush(heap, (-float(load[e]) / count[e], e))
    return count


def _donor(load: np.ndarray, count: np.ndarray) -> int:
    """Expert that loses least by giving up a replica (lowest load per replica after the loss)."""
    after = np.where(count >= 2, load / np.maximum(count - 1, 1), np.inf)
    return int(np.argmin(after))


def _repair_counts(load: np.ndarray, count: np.ndarray, num_slots: int) -> np.ndarray:
    """Current counts -> valid ones (every expert >= 1 replica, sum == num_slots) with the fewest changes."""
    count = count.copy()
    free = num_slots - int(count.sum())  # slots holding no valid expert now
    for e in np.flatnonzero(count == 0)[np.argsort(-load[count == 0], kind="stable")]:
        if free > 0:
            free -= 1
        else:
            count[_donor(load, count)] -= 1
        count[e] = 1
    for _ in range(free):
        count[np.argmax(load / count)] += 1
    return count


def _capped_counts(load: np.ndarray, count: np.ndarray, cap: float) -> np.ndarray:
    """Move replicas from the cheapest donors to the hottest expert until no load per replica exceeds cap.

    Terminates within cap >= the greedy optimum: a hot expert short of replicas implies a donor with spare ones.
    """
    count = count.copy()
    while True:
        per_replica = load / count
        hot = int(np.argmax(per_replica))
        if per_replica[hot] <= cap:
            return count
        donor = _donor(load, count)
        if count[donor] < 2 or load[donor] / (count[donor] - 1) >= per_replica[hot]:
            return count  # no transfer lowers the max any more
        count[donor] -= 1
        count[hot] += 1


def _count_candidates(load: np.ndarray, cur: np.ndarray, scratch_count: np.ndarray) -> list[np.ndarray]:
    """Replica-count vectors to try: the current counts moved just enough towards hot experts, then the scratch
    placement's counts. Cap: _COUNT_CAP x the greedy optimum load per replica, or the scratch's own max if
    higher (its local search may trade a replica for a better packing; an unchanged load must move nothing)."""
    num_slots = int(scratch_count.sum())
    base = _repair_counts(load, np.bincount(cur[cur >= 0], minlength=load.shape[0]), num_slots)
    cap = max(float((load / greedy_counts(load, num_slots)).max()) * _COUNT_CAP,
              float((load / scratch_count).max()))
    capped = _capped_counts(load, base, cap)
    return [capped] if np.array_equal(capped, scratch_count) else [capped, scratch_count]


# ----------------------------------------------------------------------------------------------- packing
def _lpt_fill(slot_expert: np.ndarray, per_replica: np.ndarray, pending: np.ndarray, num_gpus: int) -> None:
    """Put pending experts [n] (largest load first) into the free (-1) slots of the lightest GPU that has one."""
    per_gpu = slot_expert.shape[0] // num_gpus
    used = slot_expert >= 0
    load = np.bincount(np.arange(slot_expert.shape[0])[used] // per_gpu,
                       weights=per_replica[slot_expert[used]], minlength=num_gpus)
    free: list[list[int]] = [[] for _ in range(num_gpus)]
    for slot in np.flatnonzero(~used).tolist():
        free[slot // per_gpu].append(slot)
    heap = [(float(load[g]), g) for g in range(num_gpus) if free[g]]  # ties to the lowest GPU id
    heapq.heapify(heap)
    for e in pending[np.argsort(-per_replica[pending], kind="stable")].tolist():
        gpu_load, g = heapq.heappop(heap)
        slot_expert[free[g].pop(0)] = e
        if free[g]:
            heapq.heappush(heap, (gpu_load + float(per_replica[e]), g))


def _swap_options(slot_expert: np.ndarray, slot_load: np.ndarray, gpu_load: np.ndarray, g: int,
                  cur: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Swap slot i of GPU g with slot j -> [per_gpu, S]: higher load of the two GPUs after, g's load after,
    and the moves it adds."""
    per_gpu = slot_load.shape[0] // gpu_load.shape[0]
    mine = slice(g * per_gpu, (g + 1) * per_gpu)
    delta = slot_load[mine, None] - slot_load[None, :]  # load leaving g
    top_after = gpu_load[g] - delta
    worst = np.maximum(top_after, np.repeat(gpu_load, per_gpu)[None, :] + delta)
    worst[:, mine] = np.inf
    if cur is None:
        return worst, top_after, np.zeros(worst.shape, dtype=np.int64)
    x, y, home, away = slot_expert[mine, None], slot_expert[None, :], cur[mine, None], cur[None, :]
    # A slot counts as moved while it holds another expert than before; swapping back home is negative.
    added = (y != home).astype(np.int64) + (x != away) - (x != home) - (y != away)
    return worst, top_after, added


def _pick_swap(worst: np.ndarray, top_after: np.ndarray, added: np.ndarray, top: float, bound: float,
               move_aware: bool) -> int:
    """Flat index of the swap to make, or -1 if none lowers the top GPU.

    Move-aware: fewest added moves among swaps leaving both GPUs within bound; else among those bringing the
    top GPU within bound while the other stays below the old top (the repair goes on from there); else the
    lowest pair max. Without moves: the lowest pair max.
    """
    lowers = worst < top * (1 - _REL_TOL)
    if move_aware:
        tie_break = added + worst / (2 * top)  # worst < top, so added decides first
        for usable in (worst <= bound, lowers & (top_after <= bound)):
            if usable.any():
                return int(np.argmin(np.where(usable, tie_break, np.inf)))
    pick = int(np.argmin(worst + 1e-9 * top * added))
    return pick if lowers.flat[pick] else -1


def _rewrite_options(slot_expert: np.ndarray, load: np.ndarray, count: np.ndarray, gpu_load: np.ndarray,
                     g: int, cur: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Slot i of GPU g changes from expert x to y (x gives a replica to y, so every GPU holding x or y shifts)
    -> [per_gpu, E] highest load among g and the GPUs it raises (inf where not allowed), and moves it adds."""
    num_experts, num_gpus = load.shape[0], gpu_load.shape[0]
    per_gpu = slot_expert.shape[0] // num_gpus
    held = np.bincount(slot_expert * num_gpus + np.arange(slot_expert.shape[0]) // per_gpu,
                       minlength=num_experts * num_gpus).reshape(num_experts, num_gpus)  # [E, G] replicas
    per, less, more = load / count, load / np.maximum(count - 1, 1), load / (count + 1)
    x = slot_expert[g * per_gpu:(g + 1) * per_gpu]
    new = (gpu_load + (held * (less - per)[:, None])[x][:, None, :]
           + (held * (more - per)[:, None])[None, :, :])  # [per_gpu, E, G]
    new[:, :, g] += more[None, :] - less[x][:, None]
    allowed = (count[x] >= 2)[:, None] & (np.arange(num_experts)[None, :] != x[:, None])
    raised = (new > gpu_load) | (np.arange(num_gpus) == g)
    worst = np.where(allowed, np.where(raised, new, -np.inf).max(-1), np.inf)
    if cur is None:
        return worst, np.zeros(worst.shape, dtype=np.int64)
    home = cur[g * per_gpu:(g + 1) * per_gpu, None]
    return worst, (np.arange(num_experts)[None, :] != home).astype(np.int64) - (x[:, None] != home)


def _improve(slot_expert: np.ndarray, load: np.ndarray, num_gpus: int, bound: float,
             cur: np.ndarray | None = None) -> None:
    """Lower the most loaded GPU until it is <= bound or nothing helps: swap two slots (replica counts kept,
    see _pick_swap); only when no swap helps, the change of one slot's expert (a replica changes hands) with
    the lowest resulting load on the GPUs it raises. With cur, ties go to fewer added moves."""
    per_gpu = slot_expert.shape[0] // num_gpus
    count = np.bincount(slot_expert, minlength=load.shape[0])
    slot_load = (load / count)[slot_expert]
    gpu_load = slot_load.reshape(num_gpus, per_gpu).sum(1)
    for _ in range(4 * slot_expert.shape[0]):
        g = int(np.argmax(gpu_load))
        top = gpu_load[g]
        if top <= bound:
            return
        worst, top_after, added = _swap_options(slot_expert, slot_load, gpu_load, g, cur)
        pick = _pick_swap(worst, top_after, added, top, bound, cur is not None)
        if pick >= 0:
            i, j = divmod(pick, slot_expert.shape[0])
            i += g * per_gpu
            shift = slot_load[i] - slot_load[j]
            slot_expert[i], slot_expert[j] = slot_expert[j], slot_expert[i]
            slot_load[i], slot_load[j] = slot_load[j], slot_load[i]
            gpu_load[g] -= shift
            gpu_load[j // per_gpu] += shift
            continue
        worst, added = _rewrite_options(slot_expert, load, count, gpu_load, g, cur)
        pick = int(np.argmin(worst + 1e-9 * top * added))
        if not worst.flat[pick] < top * (1 - _REL_TOL):
            return
        i, y = divmod(pick, load.shape[0])
        slot_expert[i + g * per_gpu] = y
        count = np.bincount(slot_expert, minlength=load.shape[0])  # two experts' replicas changed size
        slot_load = (load / count)[slot_expert]
        gpu_load = slot_load.reshape(num_gpus, per_gpu).sum(1)


def _max_load(load: np.ndarray, slot_expert: np.ndarray, num_gpus: int) -> float:
    count = np.bincount(slot_expert, minlength=load.shape[0])
    return float((load[slot_expert] / count[slot_expert]).reshape(num_gpus, -1).sum(1).max())


def _scratch(load: np.ndarray, count: np.ndarray, num_gpus: int) -> tuple[np.ndarray, float]:
    """Counts [E] -> (slot_expert [S], max GPU load of DeepSeek's packing): that packing, then local search."""
    slot_expert = np.full(int(count.sum()), -1, dtype=np.int64)
    _lpt_fill(slot_expert, load / count, np.repeat(np.arange(load.shape[0]), count), num_gpus)
    greedy_max = _max_load(load, slot_expert, num_gpus)
    _improve(slot_expert, load, num_gpus, 0.0)
    return _kicked(slot_expert, load, num_gpus), greedy_max


def _kicked(slot_expert: np.ndarray, load: np.ndarray, num_gpus: int) -> np.ndarray:
    """Escape the local optimum a few times: a random change of one slot's expert on the most loaded GPU, then
    local search again; keep what lowers the max. Skipped at the mean-load bound (nothing left to gain).

    Replica counts are where the greedy start is weakest when GPUs have few slots (brute force: mean gap to
    the optimum 2.0% -> 0.9%); the seeded generator keeps the result a function of the load.
    """
    best, best_max = slot_expert, _max_load(load, slot_expert, num_gpus)
    floor = load.sum() / num_gpus * (1 + 1e-3)
    rng = np.random.default_rng(0)
    per_gpu = slot_expert.shape[0] // num_gpus
    for _ in range(_KICKS):
        if best_max <= floor:
            break
        trial = best.copy()
        count = np.bincount(trial, minlength=load.shape[0])
        gpu_load = (load / count)[trial].reshape(num_gpus, per_gpu).sum(1)
        g = int(np.argmax(gpu_load))
        allowed = np.flatnonzero(np.isfinite(_rewrite_options(trial, load, count, gpu_load, g, None)[0]))
        if allowed.size == 0:
            break
        i, y = divmod(int(rng.choice(allowed)), load.shape[0])
        trial[i + g * per_gpu] = y
        _improve(trial, load, num_gpus, 0.0)
        trial_max = _max_load(load, trial, num_gpus)
        if trial_max < best_max * (1 - _REL_TOL):
            best, best_max = trial, trial_max
    return best


def _sticky(load: np.ndarray, count: np.ndarray, cur: np.ndarray, num_gpus: int, bound: float) -> np.ndarray:
    """Counts [E], current [S] -> slot_expert [S] keeping slots in place, extra replicas LPT, then swaps."""
    num_slots = cur.shape[0]
    per_gpu = num_slots // num_gpus
    per_replica = load / count
    valid = np.flatnonzero(cur >= 0)
    gpu_load = np.bincount(valid // per_gpu, weights=per_replica[cur[valid]], minlength=num_gpus)
    # An expert losing replicas drops them from its most loaded GPUs: sort by expert, then GPU load.
    order = valid[np.lexsort((-gpu_load[valid // per_gpu], cur[valid]))]
    expert = cur[order]
    rank = np.arange(order.shape[0]) - np.searchsorted(expert, expert, side="left")
    keep = rank >= (np.bincount(expert, minlength=load.shape[0]) - count)[expert]
    slot_expert = np.full(num_slots, -1, dtype=np.int64)
    slot_expert[order[keep]] = expert[keep]
    kept = np.bincount(slot_expert[slot_expert >= 0], minlength=load.shape[0])
    _lpt_fill(slot_expert, per_replica, np.repeat(np.arange(load.shape[0]), count - kept), num_gpus)
    _improve(slot_expert, load, num_gpus, bound, cur)
    _match_slots(slot_expert, cur, num_gpus)
    return slot_expert


def _match_slots(slot_expert: np.ndarray, cur: np.ndarray, num_gpus: int) -> None:
    """Within each GPU, reorder slots so a slot that held expert X keeps X whenever the GPU still holds X."""
    per_gpu = slot_expert.shape[0] // num_gpus
    for g in range(num_gpus):
        mine = slice(g * per_gpu, (g + 1) * per_gpu)
        new, old = slot_expert[mine], cur[mine]
        if np.array_equal(new, old):
            continue
        pool = list(new)
        out = np.full(per_gpu, -1, dtype=np.int64)
        for i, e in enumerate(old):  # first the slots that can keep their expert
            if e in pool:
                pool.remove(e)
                out[i] = e
        out[out < 0] = pool  # then the rest in any order
        slot_expert[mine] = out


def _relabel_gpus(slot_expert: np.ndarray, cur: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """Permute whole GPUs of a fresh placement to overlap the current one (greedy on shared replicas)."""
    per_gpu = slot_expert.shape[0] // num_gpus
    def histogram(p: np.ndarray) -> np.ndarray:  # [G, E] replicas of each expert on each GPU
        ok = p >= 0
        gpu = np.arange(p.shape[0])[ok] // per_gpu
        return np.bincount(gpu * num_experts + p[ok], minlength=num_gpus * num_experts).reshape(num_gpus, -1)
    overlap = np.minimum(histogram(slot_expert)[:, None, :], histogram(cur)[None, :, :]).sum(-1)  # [new, old]
    target = np.full(num_gpus, -1)
    taken = np.zeros(num_gpus, dtype=bool)
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        new, old = divmod(int(flat), num_gpus)
        if target[new] < 0 and not taken[old]:
            target[new], taken[old] = old, True
    out = np.empty_like(slot_expert)
    for new in range(num_gpus):
        out[target[new] * per_gpu:(target[new] + 1) * per_gpu] = slot_expert[new * per_gpu:(new + 1) * per_gpu]
    _match_slots(out, cur, num_gpus)
    return out


# ------------------------------------------------------------------------------------------------- layers
def solve_flat(load: np.ndarray, num_slots: int, num_gpus: int, cur: np.ndarray | None, slack: float,
                scratch: tuple[np.ndarray, float] | None = None, floor: float = 0.0,
                fixed_counts: bool = False) -> np.ndarray:
    """[E] load -> [S] phy2log on num_gpus GPUs; with cur, the fewest moves within the balance bound.

    floor: a max load the caller already accepts (other nodes), so this node may use it as its bound too.
    fixed_counts: one replica per item (packing groups onto nodes).
    """
    if scratch is None:
        count = np.ones_like(load, dtype=np.int64) if fixed_counts else greedy_counts(load, num_slots)
        scratch = _scratch(load, count, num_gpus)
    best, greedy_max = scratch
    if cur is None:
        return best
    # Within slack of our best, and never above what DeepSeek's greedy would reach on this load.
    bound = max(min(_max_load(load, best, num_gpus) * (1 + slack), greedy_max), floor)
    scratch_count = np.bincount(best, minlength=load.shape[0])
    candidates = [scratch_count] if fixed_counts else _count_candidates(load, cur, scratch_count)
    for count in candidates:  # fewest count changes first
        placed = _sticky(load, count, cur, num_gpus, bound)
        if _max_load(load, placed, num_gpus) <= bound * (1 + _REL_TOL):
            return placed
    return _relabel_gpus(best, cur, num_gpus, load.shape[0])


def _group_positions(cur: np.ndarray, group_size: int, num_groups: int, num_nodes: int) -> np.ndarray:
    """current [S] -> [num_groups] positions (node-major, groups_per_node per node) -> group now there, or -1."""
    node_of_slot = np.arange(cur.shape[0]) // (cur.shape[0] // num_nodes)
    ok = cur >= 0
    slots = np.bincount((cur[ok] // group_size) * num_nodes + node_of_slot[ok],
                        minlength=num_groups * num_nodes).reshape(num_groups, num_nodes)
    per_node = num_groups // num_nodes
    pos = np.full(num_groups, -1, dtype=np.int64)
    home = np.argmax(slots, axis=1)
    for node in range(num_nodes):  # the groups with most slots on the node keep a position there
        mine = np.flatnonzero((home == node) & (slots[:, node] > 0))
        mine = mine[np.argsort(-slots[mine, node], kind="stable")][:per_node]
        pos[node * per_node:node * per_node + mine.shape[0]] = mine
    return pos


def solve_hierarchical(load: np.ndarray, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int,
                        cur: np.ndarray | None, slack: float) -> np.ndarray:
    """[E] -> [S]: groups packed onto nodes, then each node replicated and packed on its own GPUs."""
    num_experts = load.shape[0]
    group_size, per_node = num_experts // num_groups, num_groups // num_nodes
    node_slots, node_gpus = num_slots // num_nodes, num_gpus // num_nodes
    group_load = load.reshape(num_groups, group_size).sum(1)
    cur_pos = None if cur is None else _group_positions(cur, group_size, num_groups, num_nodes)
    group_at = solve_flat(group_load, num_groups, num_nodes, cur_pos, slack, fixed_counts=True)
    experts, scratch = [], []
    for node in range(num_nodes):
        groups = np.sort(group_at[node * per_node:(node + 1) * per_node])  # order-free: reruns match
        experts.append((groups[:, None] * group_size + np.arange(group_size)).ravel())  # local -> global id
        scratch.append(_scratch(load[experts[-1]], greedy_counts(load[experts[-1]], node_slots), node_gpus))
    floor = max(_max_load(load[e], s[0], node_gpus) for e, s in zip(experts, scratch))
    out = np.empty(num_slots, dtype=np.int64)
    for node in range(num_nodes):
        local_cur = None
        if cur is not None:  # global ids -> node-local ids; experts of groups now elsewhere read as -1
            local_id = np.full(num_experts + 1, -1, dtype=np.int64)
            local_id[experts[node]] = np.arange(experts[node].shape[0])
            local_cur = local_id[cur[node * node_slots:(node + 1) * node_slots]]
        local = solve_flat(load[experts[node]], node_slots, node_gpus, local_cur, slack, scratch[node], floor)
        out[node * node_slots:(node + 1) * node_slots] = experts[node][local]
    return out
