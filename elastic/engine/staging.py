"""The next layout of a scale operation, built beside the serving one, one piece per step.

Two NCCL communicators must never have collectives in flight at once on a GPU: a kernel of one waits for its
peers while a driver call of the other thread (an allocation, a sync) holds the GPU back, and two ranks
can wait on each other for ever. So every piece that moves data runs on the engine's own thread between
two steps, in the same order on every rank (ranks step in lockstep, so the pieces pair up across ranks):

    grow (old ranks)    dense weights to our new ranks -> placement shared, slots allocated -> MoE layers'
                        experts, up to 2 GiB per rank per step, over the new group -> balancer (and the new
                        group's communicator set up)
    shrink (survivors)  slots allocated and the next exchange's peer buffers mapped -> the new group's
                        communicator set up -> layers' experts over the old group
    shrink (leaving)    layers' experts, sending only
    joining rank        the same pieces at start-up, all at once (EngineCore._receive_weights)

Only the CUDA-graph capture runs in a background thread (`capture`): its warm-ups use stand-in
collectives, and a capture records collectives without running them, so it talks to no other rank. A shrink
starts it as soon as the survivors' peer-to-peer buffers are mapped (their graphs record no NCCL collective),
beside the communicator's set-up and the experts' moves. Allocations, syncs and CUDA IPC stay on the engine's
thread: from a background thread, beside the serving collectives, they hung every rank (4 x H200, 2026-11-26).
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import TYPE_CHECKING, Callable

import torch

from elastic.distributed.expert_parallel import apply_expert_parallel
from elastic.distributed.parallel_state import ParallelState
from elastic.engine.reconfigure import (StagedLayout, parallel_config_for, resize_placement, send_dense_weights,
                                        share_placement, transfer_layer)
from elastic.eplb.balancer import ExpertBalancer, warm_up
from elastic.eplb.transfer import SlotMove, plan_moves
from elastic.layers.moe import ExpertLayout, ExpertSlots
from elastic.protocol.scaling import ParallelLayout

if TYPE_CHECKING:
    from elastic.engine.core import EngineCore

logger = logging.getLogger(__name__)

_STEP_BYTES = 2 << 30  # experts a rank receives in one staging step: ~10 ms over NVLink, one step's pause


@dataclasses.dataclass(frozen=True)
class PlacementPlan:
    """The next placement and each MoE layer's slot moves, computed from the placement in force. The same on
    every old rank (they froze the same placement), so every rank plans the same pieces. Pure CPU work
    (~50-150 ms for 48 layers): computed in the background before the freeze, reused if the placement did not
    change meanwhile."""

    old_p2l: torch.Tensor  # [L, old slots]
    new_p2l: torch.Tensor  # [L, new slots]
    moves: list[list[SlotMove]]

    @staticmethod
    def compute(old_p2l: torch.Tensor, old_world: int, new_world: int, num_experts: int,
                redundant: int) -> PlacementPlan:
        new_p2l = resize_placement(old_p2l, old_world, new_world, num_experts, redundant)
        old_spr, new_spr = old_p2l.shape[1] // old_world, new_p2l.shape[1] // new_world
        moves = [plan_moves(old_p2l[i].tolist(), old_spr, new_p2l[i].tolist(), new_spr)
                 for i in range(old_p2l.shape[0])]
        return PlacementPlan(old_p2l, new_p2l, moves)


class LayoutStaging:
    def __init__(self, core: EngineCore, layout: ParallelLayout | None, groups: ParallelState | None,
                 old_world: int, new_world: int, plan: PlacementPlan, send_weights_to: list[int],
                 timeout_s: float) -> None:
        """`layout`: this rank's next layout (None: it leaves); `groups`: that layout's, built beforehand
        (None at size 1); `plan`: from the placement in force, frozen at a step every old rank agreed on."""
        self.core, self.layout, self.groups = core, layout, groups
        self.old_world, self.new_world = old_world, new_world
        self.old_p2l, self.new_p2l, self.plans = plan.old_p2l, plan.new_p2l, plan.moves
        self.send_weights_to, self.timeout_s = send_weights_to, timeout_s
        self.rank = core.layout.rank  # ranks keep their numbers across a resize
        self.moe = core.runner.model.moe_layers()
        self.slots: list[ExpertSlots] | None = None  # this rank's next slots (None: it leaves)
        self.balancer: ExpertBalancer | None = None
        self.connected = False  # the next slots are routed through the next group: graphs may be captured
        config = core.config
        self.config = dataclasses.replace(config, parallel=parallel_config_for(config.parallel, layout)) \
            if layout is not None else config

    @property
    def growing(self) -> bool:
        return self.new_world > self.old_world

    def pieces(self) -> list[Callable[[], None]]:
        """What to run, one per step, in this order (the same count and order of collectives on every rank).
        A shrink connects the survivors' next group before moving experts, so that their graphs are captured
        (`connected`) while the experts move; a leaving rank steps through that piece with nothing to do."""
        layers = [self._layers_piece(group) for group in self._layer_groups()]
        if self.layout is None:
            return [self._place, _nothing, *layers]
        if self.growing:
            return [self._send_dense, self._place, *layers, self._connect]
        return [self._place, self._connect, *layers]

    # ---- pieces (the engine's thread, between steps) ----------------------------------------------------------
    def _send_dense(self) -> None:
        if self.send_weights_to:
            assert self.groups is not None
            send_dense_weights(self.core.runner.model, self.groups.ep, self.send_weights_to)

    def _place(self) -> None:
        """The new ranks learn the placement in force (they have none); this rank's next slots."""
        if self.growing:
            assert self.groups is not None
            share_placement(self.groups.dp, self.old_p2l, self.timeout_s)
        if self.layout is not None:
            arch, redundant = self.config.model.arch, self.config.parallel.num_redundant_experts
            expert_layout = ExpertLayout.for_ranks(arch.num_experts, redundant, self.new_world, self.layout.rank)
            self.slots = [m.stage(expert_layout) for m in self.moe]
            if not self.growing:
                self._route()

    def _route(self) -> None:
        """The next slots routed through the next group: its exchange set up through the group's store (no NCCL
        collective); the balancer over them. Graphs may be captured from here on if they record no NCCL
        collective (a peer-to-peer exchange, or a single rank); else once `_connect` set the communicator up."""
        ep = self.groups.ep if self.groups is not None else None
        comm = apply_expert_parallel(self.core.runner.model, ep, self.config.parallel.ep_dispatch, staged=True,
                                     p2p_capacity=self.core.config.scheduler.max_step_tokens)
        if self.config.eplb.enable_eplb and self.slots:
            assert self.layout is not None
            self.balancer = ExpertBalancer(self.slots, self.config.eplb, self.layout.rank, self.new_world,
                                           num_groups=self.config.model.arch.num_expert_groups)
        self.connected = comm is None or comm.exchange is not None

    def _layer_groups(self) -> list[list[int]]:
        """MoE layers batched so that no rank receives more than _STEP_BYTES of experts in one step."""
        if not self.moe:
            return []
        slot_bytes = self.moe[0].w13.data[0].nbytes + self.moe[0].w2.data[0].nbytes
        groups: list[list[int]] = [[]]
        size = 0
        for i, moves in enumerate(self.plans):
            received = Counter(m.dst_rank for m in moves if m.src_rank != m.dst_rank)
            layer_bytes = max(received.values(), default=0) * slot_bytes
            if groups[-1] and size + layer_bytes > _STEP_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += layer_bytes
        return groups

    def _layers_piece(self, layers: list[int]) -> Callable[[], None]:
        def experts() -> None:  # (the name is what the staging log reports)
            for i in layers:
                transfer_layer(i, self.old_p2l, self.new_p2l, self.old_world, self.new_world, self.rank,
                               [m.live for m in self.moe], self.slots, self._transfer_group(), moves=self.plans[i])
        return experts

    def _transfer_group(self):  # noqa: ANN202 - StatelessGroup | None
        if self.growing:
            return self.groups.ep if self.groups is not None else None  # the new ranks are only there
        return self.core.parallel.ep if self.core.parallel is not None else None  # leaving ranks are only here

    def _connect(self) -> None:
        """The new group's communicator set up now, on this thread (a capture must not be the first to use
        it), with the channels a rebalance uses; when growing, the next slots routed (all in the order of a
        joining rank's start-up: EngineCore.__init__)."""
        ep = self.groups.ep if self.groups is not None else None
        if ep is not None:
            ep.barrier()
        if self.growing:
            self._route()
        if ep is not None and self.balancer is not None:
            warm_up(ep)
        self.connected = True

    # ---- the background part ---------------------------------------------------------------------------------
    def capture(self) -> StagedLayout:
        """The next layout's CUDA graphs over the staged slots (a background thread, beside serving)."""
        assert self.layout is not None
        graphs = self.core.runner.stage_cuda_graphs(self.config.parallel)
        return StagedLayout(self.layout, self.groups, self.config, self.balancer, graphs)


def _nothing() -> None:
    """A leaving rank's step while the survivors connect their next group (pieces pair up by position)."""
