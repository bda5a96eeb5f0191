"""EPLB at run time on one rank: the expert-load window, when to rebalance, and a rebalance in progress.

Every rank of the EP group steps in lockstep, so every decision here is taken at the same step everywhere:
a rebalance starts when the step counter reaches the interval (or when any rank was asked to, a flag the
per-step DP exchange ORs), the window is all-reduced, the policy (deterministic) gives every rank the same
placement, and then one MoE layer per step moves its changed slots and switches its maps, between two
forwards. No forward ever sees a half-moved layer, and no step stalls for more than one layer's copy.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from elastic.config.engine import EplbConfig
from elastic.distributed.group import StatelessGroup
from elastic.eplb.policy import balancedness, rebalance_experts
from elastic.eplb.transfer import SlotMove, execute_moves, plan_moves
from elastic.layers.moe import ExpertSlots
from elastic.protocol.from_engine import EplbStats

logger = logging.getLogger(__name__)



@dataclass
class _Rebalance:
    """One rebalance being carried out, layer by layer."""

    number: int
    started: float
    new_p2l: torch.Tensor  # [L, S]
    plans: dict[int, list[SlotMove]]
    todo: deque[int]
    balancedness_before: float
    balancedness_after: float
    bytes_moved: int = 0
    longest_stall_s: float = 0.0
    stalls: dict[str, float] = field(default_factory=dict)  # where the longest pauses came from, for the log
    slots_moved: int = field(init=False)

    def __post_init__(self) -> None:
        self.slots_moved = sum(len(p) for p in self.plans.values())


class ExpertBalancer:
    def __init__(self, layers: list[ExpertSlots], config: EplbConfig, rank: int, num_ranks: int,
                 num_groups: int = 1) -> None:
        self.layers, self.config = layers, config
        self.rank, self.num_ranks, self.num_groups = rank, num_ranks, num_groups
        self.num_physical = layers[0].num_physical
        device = layers[0].w13.device
        # step_load[l] is layer l's counter (its expert_load is a view of it); the window keeps the last
        # `window_size` steps of it, so old load ages out.
        self.step_load = torch.zeros(len(layers), self.num_physical, dtype=torch.long, device=device)
        for i, layer in enumerate(layers):
            layer.expert_load = self.step_load[i]
        self.window = torch.zeros(config.eplb_window_size, *self.step_load.shape, dtype=torch.long, device=device)
        self.window_pos = 0
        self.steps_since_rebalance = 0
        self.requested = False
        self.started = 0  # rebalances begun on this rank (every rank begins them at the same step)
        self.current: _Rebalance | None = None
        # The placement being computed in a background thread (tens to hundreds of ms of CPU for a large
        # model); moves start at the first step at which every rank's thread is done (the DP exchange ANDs
        # `plan_ready`), so no rank ever waits for it.
        self.planning: Future | None = None
        self.collect_stall_s = 0.0
        self.planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-plan")
        self.stats = EplbStats()

    @property
    def busy(self) -> bool:
        return self.current is not None or self.planning is not None

    def due(self) -> bool:
        """Whether this rank wants a rebalance to start at this step."""
        return not self.busy and (self.requested or self.steps_since_rebalance >= self.config.eplb_step_interval)

    @property
    def plan_ready(self) -> bool:
        return self.planning is not None and self.planning.done()

    def request(self, number: int) -> None:
        """Ask for rebalance `number` (counted from 1 over every rebalance started, skipped ones included).
        The front end asks every rank for the same number: a rank that hears it after the rebalance already
        started (another rank's request reached the per-step exchange first) must not ask again."""
        if number > self.started:
            self.requested = True

    def record_step(self) -> None:
        """After every step, dummy steps of an idle DP rank included (their rows are zero), so the window
        advances alike on every rank."""
        self.window[self.window_pos].copy_(self.step_load)
        self.step_load.zero_()
        self.window_pos = (self.window_pos + 1) % self.window.shape[0]
        self.steps_since_rebalance += 1

    # ---- a rebalance ------------------------------------------------------------------------------------
    def placement(self) -> torch.Tensor:
        return torch.stack([layer.physical_to_logical.cpu() for layer in self.layers])  # [L, S]

    def logical_load(self, group: StatelessGroup | None) -> torch.Tensor:
        """The window's tokens per logical expert over the whole EP group: [L, E] (one host sync)."""
        physical = self.window.sum(0)  # [L, S]
        if group is not None:
            physical = group.all_reduce(physical)
        physical = physical.cpu()
        logical = torch.zeros(len(self.layers), self.layers[0].num_logical, dtype=torch.long)
        return logical.scatter_add_(1, self.placement(), physical)

    def begin(self, group: StatelessGroup | None) -> None:
        """Collect the window over the group (every rank at this same step) and start computing the new
        placement in the background; the moves start once every rank has it (see `advance`)."""
        started = time.perf_counter()
        self.requested, self.steps_since_rebalance = False, 0
        self.started += 1
        weight = self.logical_load(group)
        self.planning = self.planner.submit(self._plan, weight, self.placement(), started)
        self.collect_stall_s = time.perf_counter() - started

    def _plan(self, weight: torch.Tensor, current: torch.Tensor, started: float) -> _Rebalance | None:
        """Background thread: the policy (deterministic, so every rank gets the same) and each layer's moves."""
        new_p2l = rebalance_experts(weight, self.num_physical, self.num_groups, 1, self.num_ranks, current)[0]
        before = balancedness(weight, current, self.num_ranks)
        after = balancedness(weight, new_p2l, self.num_ranks)
        spr = self.layers[0].slots_per_rank
        plans = {i: plan_moves(current[i].tolist(), spr, new_p2l[i].tolist(), spr) for i in range(len(self.layers))}
        number = self.stats.rebalances + 1
        reb = _Rebalance(number, started, new_p2l, plans, deque(i for i, p in plans.items() if p), before, after)
        if after - before < self.config.eplb_min_gain or not reb.todo:
            self._log("skipped", before, after, 0, time.perf_counter() - started)
            return None
        return reb

    def _take_plan(self) -> None:
        """At the agreed step (every rank has its plan): the background placement becomes the current one."""
        start = time.perf_counter()
        assert self.planning is not None
        reb = self.planning.result()
        self.planning = None
        wait = time.perf_counter() - start
        if reb is None:
            self.stats.skipped += 1
            return
        reb.longest_stall_s = max(self.collect_stall_s, wait)
        reb.stalls = {"collect": self.collect_stall_s, "plan_wait": wait, "first_layer": 0.0, "layer_max": 0.0}
        self.current = reb

    def advance(self, group: StatelessGroup | None, plans_ready: bool) -> None:
        """Move one layer's changed slots and switch its maps (call between steps, on every rank alike).
        plans_ready: every rank of the group has its placement (this rank's `plan_ready`, ANDed over ranks)."""
        if self.planning is not None:
            if not plans_ready:
                return
            self._take_plan()
        reb = self.current
        if reb is None:
            return
        start = time.perf_counter()
        layer_index = reb.todo.popleft()
        layer = self.layers[layer_index]
        weights = (layer.w13.data, layer.w2.data)
        reb.bytes_moved += execute_moves(reb.plans[layer_index], self.rank, weights, weights, group)
        layer.set_placement(reb.new_p2l[layer_index])
        if layer.w13.is_cuda:
            torch.cuda.current_stream().synchronize()  # the stall is what the next step waits for
        stall = time.perf_counter() - start
        reb.longest_stall_s = max(reb.longest_stall_s, stall)
        reb.stalls["first_layer"] = reb.stalls.get("first_layer") or stall
        reb.stalls["layer_max"] = max(reb.stalls.get("layer_max", 0.0), stall)
        if not reb.todo:
            self._finish(reb)

    def _finish(self, reb: _Rebalance) -> None:
        s = self.stats
        s.rebalances, s.balancedness = reb.number, reb.balancedness_after
        s.balancedness_before = reb.balancedness_before
        s.bytes_moved += reb.bytes_moved
        s.slots_moved += reb.slots_moved
        s.last_rebalance_s = time.perf_counter() - reb.started
        s.longest_stall_s = max(s.longest_stall_s, reb.longest_stall_s)
        s.last_stall_s = reb.longest_stall_s
        self.current = None
        self._log(f"rebalance {reb.number} done", reb.balancedness_before, reb.balancedness_after, reb.slots_moved,
                  s.last_rebalance_s)
        logger.info("EPLB rank %d: step stalls (ms): %s", self.rank,
                    ", ".join(f"{k} {v * 1e3:.1f}" for k, v in reb.stalls.items()))

    def _log(self, what: str, before: float, after: float, slots: int, seconds: float) -> None:
        level = logging.INFO if self.config.eplb_log_balancedness or slots else logging.DEBUG
        logger.log(level, "EPLB rank %d: %s: balancedness %.3f -> %.3f, %d slots moved, %.3fs", self.rank, what,
                   before, after, slots, seconds)

    def describe(self) -> dict:
        """Placement and figures for GET /eplb."""
        p2l = self.placement()
        counts = [torch.bincount(row, minlength=self.layers[0].num_logical).tolist() for row in p2l]
        return {"num_ranks": self.num_ranks, "slots_per_rank": self.layers[0].slots_per_rank,
                "physical_to_logical": p2l.tolist(), "replica_counts": counts,
                "in_progress": self.busy, "started": self.started, "stats": {f: getattr(self.stats, f) for f in self.stats.__struct_fields__}}


def warm_up(group: StatelessGroup) -> None:
    """One tiny all-to-all now (every rank of the group at start-up): NCCL connects peer-to-peer channels
    lazily, and that set-up (~0.2 s) must not land inside the first rebalance's step stall."""
    ones = torch.ones(group.world_size, dtype=torch.long, device=group.device)
    group.all_to_all(ones, [1] * group.world_size, [1] * group.world_size)
