"""An engine's side of fault recovery: a peer rank died (or hung) and this rank carries on without it.

- `FaultWatcher` (a thread beside the busy loop): heartbeats into the launcher's TCPStore, and the
  launcher's abort signal, which marks the step under way as failed and aborts the NCCL communicators, so
  a main thread blocked in a collective with a dead peer gets out (gloo raises by itself when a peer's
  connection closes; a peer that hangs is killed by the launcher, which closes it).
- `RankRecovery`: a step whose collective failed leaves the scheduler as it was before the step (its
  tokens were never appended), so this rank stops stepping, keeps its requests and tells the launcher
  (RankFault). On RecoverLayout it rebuilds the groups over the survivors, renumbers the expert slots
  (survivors keep the experts they hold), restores the experts only the dead ranks held (from a surviving
  replica, else from the checkpoint), and serves on from the same requests.
"""
from __future__ import annotations

import datetime
import logging
from collections import Counter
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgspec
import torch
import zmq

from elastic.distributed.group import create_store
from elastic.distributed.parallel_state import ParallelState
from elastic.engine.reconfigure import commit_barrier, placement_of, slots_per_rank
from elastic.engine.scale_agent import set_cpu_threads
from elastic.executor.model_runner import free_device_bytes
from elastic.eplb.transfer import execute_moves, plan_moves
from elastic.layers.moe import ExpertLayout, FusedMoE
from elastic.models.loader import checkpoint_files, map_name
from elastic.protocol.fault import HEARTBEAT_INTERVAL_S, RankFault, RecoverLayout, abort_key, heartbeat_key
from elastic.protocol.scaling import ParallelLayout, ScaleCommitted

logger = logging.getLogger(__name__)


class FaultWatcher:
    """Heartbeats (a counter the launcher watches) and the abort signal (a counter the launcher bumps), both
    on the launcher's TCPStore, from a thread: they work while the main thread is blocked in a collective."""

    def __init__(self, engine_id: int, host: str, port: int, on_abort: Callable[[int], None]) -> None:
        self.engine_id, self.host, self.port, self.on_abort = engine_id, host, port, on_abort
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fault-watcher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            store = create_store(self.host, self.port, is_master=False, timeout=datetime.timedelta(seconds=10))
        except Exception as e:  # no store (the launcher is gone): nothing to watch
            logger.warning("fault watcher not started: %s", e)
            return
        key, handled = abort_key(self.engine_id), -1
        while not self.stopped.wait(HEARTBEAT_INTERVAL_S):
            try:
                store.add(heartbeat_key(self.engine_id), 1)
                epoch = int(store.get(key)) if store.check([key]) else -1
            except Exception:  # the launcher is gone; the death pipe ends this process
                return
            if epoch != handled:  # a failure in the layout of that epoch; a later layout is not affected
                handled = epoch
                self.on_abort(epoch)

    def stop(self) -> None:
        self.stopped.set()


class RankRecovery:
    """Owned by the engine process (`proc`: EngineCoreProc); `broken` while this rank waits to be recovered."""

    def __init__(self, proc: Any, control: zmq.Socket, engine_id: int) -> None:
        self.proc, self.control, self.engine_id = proc, control, engine_id
        self.broken = False
        self.watcher: FaultWatcher | None = None
        self.encoder = msgspec.msgpack.Encoder()
        self.watch()

    def watch(self) -> None:
        """Start the watcher once this rank has a distributed layout (at start-up, or after a scale-up)."""
        layout = self.proc.core.layout
        if self.watcher is None and layout.is_distributed and layout.store_port:
            self.watcher = FaultWatcher(self.engine_id, layout.store_host, layout.store_port, self._abort)

    def _abort(self, epoch: int) -> None:
        """(watcher thread) The launcher says a peer of the layout of `epoch` failed: if that is still this
        rank's layout, whatever its step computes may be garbage."""
        core = self.proc.core
        if epoch < core.layout.epoch:
            return  # recovered already (the signal is polled, the recovery may be quicker)
        core.peer_failed.set()  # first: the step checks it after its last collective
        abort_groups(core.parallel)
        logger.warning("engine %d: a peer rank failed; its collectives are aborted", self.engine_id)

    def step_failed(self, error: Exception) -> bool:
        """A step raised. With peers this is a collective that lost one of them: stop stepping, keep the
        requests (the step appended nothing), tell the launcher. A single rank's failure is a real error."""
        core = self.proc.core
        if core.parallel is None:
            return False
        if not self.broken:
            logger.error("engine %d: a collective failed (%s: %s); waiting for the recovery", self.engine_id,
                         type(error).__name__, error)
            self.broken = True
            self._send(RankFault(self.engine_id, f"{type(error).__name__}: {error}", core.layout.epoch))
        return True

    def recover(self, msg: RecoverLayout) -> None:
        started = time.monotonic()
        try:
            self._switch(msg)
        except Exception as e:  # this rank stays broken; the launcher decides (it stops it)
            logger.exception("engine %d: recovery %s failed", self.engine_id, msg.op)
            self._send(ScaleCommitted(self.engine_id, msg.op, error=f"{type(e).__name__}: {e}"))
            return
        self.broken = False
        self.proc.core.peer_failed.clear()
        blocking = time.monotonic() - started
        logger.info("engine %d: recovery %s done: rank %d of %d, %.3fs", self.engine_id, msg.op, msg.layout.rank,
                    msg.layout.world_size, blocking)
        self._send(ScaleCommitted(self.engine_id, msg.op, blocking_s=blocking,
                                  free_memory_bytes=free_device_bytes(self.proc.core.config)))
        self.watch()

    def _switch(self, msg: RecoverLayout) -> None:
        core, layout = self.proc.core, msg.layout
        agent = self.proc.agent
        if agent is not None and agent.op is not None:
            agent._abort(agent.op.op)  # a scale the failure interrupted: forget it
        core.scale_commit_pending = core.scale_hold = core.scale_sync = False  # no scale step is awaited
        if core.pipeline is not None:
            core.pipeline.abandon()  # a pipelined step on its way ran beside the failed peer: computed again
        old = placement_of(core.runner.model.moe_layers())
        core.runner.release_cuda_graphs()  # they hold the broken communicators
        if core.parallel is not None:
            abort_groups(core.parallel)  # a communicator with a dead peer cannot be shut down in order
            core.parallel.destroy()
            core.parallel = None
        groups, wave = None, core.wave.number
        if layout.is_distributed:
            timeout = datetime.timedelta(seconds=msg.timeout_s)
            groups = ParallelState(layout, core.config.torch_device, rendezvous_timeout=timeout)
            (wave, _), _ = commit_barrier(groups.dp, (core.wave.number, 1), torch.empty(0, 0, dtype=torch.long),
                                          msg.timeout_s)
        compact, new, lost = survivor_placement(old, msg.old_world_size, msg.survivors, layout.world_size,
                                                core.config.model.arch.num_experts,
                                                core.config.parallel.num_redundant_experts)
        layers = core.runner.model.moe_layers()
        move_to_survivors(layers, compact, new, lost, layout, core.config, groups)
        core.layout = layout
        # The experts are in place: the switch moves nothing more (groups, KV agreement, balancer, graphs).
        core.reconfigure(layout, groups, new, new, None, layout.world_size)
        restored = restore_experts(core.runner.model, layers, lost, core.config.model)
        core.balancer = core._make_balancer()  # over the final placement
        core.wave.number, core.wave.running = wave, True  # every rank steps once, then the exchange decides
        if self.proc.dp is not None:
            self.proc.dp.engine_index = layout.rank  # the coordinator's tables are by rank
        if core.config.torch_device.type == "cpu":
            set_cpu_threads(layout.world_size)
        if restored:
            logger.info("engine %d: restored %d tensor(s) of experts only the dead rank(s) held, from the checkpoint",
                        self.engine_id, restored)

    def _send(self, msg: Any) -> None:
        self.control.send(self.encoder.encode(msg))

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()


def abort_groups(parallel: ParallelState | None) -> None:
    """Abort this rank's communicators: kernels waiting for a dead peer (NCCL's, the peer-to-peer exchange's
    barriers) return, and the collective under way (or the next) fails instead of hanging."""
    for group in (parallel.ep, parallel.dp) if parallel is not None else ():
        try:
            group.abort()
        except Exception as e:  # already torn down
            logger.debug("abort of %s: %s", group, e)


# ---- placement over the survivors -----------------------------------------------------------------------
def survivor_placement(old: torch.Tensor, old_world: int, survivors: list[int], new_world: int, num_experts: int,
                       num_redundant: int) -> tuple[torch.Tensor, torch.Tensor, list[set[int]]]:
    """(the old placement over the survivors only, renumbered [L, new_world * old_spr]; the new placement
    [L, new slots]; per layer, the experts no survivor holds). Every survivor computes the same."""
    if old.numel() == 0:
        return old, old, []
    old_spr = old.shape[1] // old_world
    new_spr = slots_per_rank(num_experts, num_redundant, new_world)
    compact = torch.cat([old[:, r * old_spr:(r + 1) * old_spr] for r in survivors], dim=1)
    new = torch.tensor([_survivor_layer(row.tolist(), old_spr, new_spr, new_world, num_experts)
                        for row in compact], dtype=torch.long)
    lost = [set(range(num_experts)) - set(row.tolist()) for row in compact]
    return compact, new, lost


def _survivor_layer(old: list[int], old_spr: int, new_spr: int, world: int, num_experts: int) -> list[int]:
    """One layer: each survivor keeps one copy of the experts it holds, in their slots (no move); the
    experts nobody holds go to the ranks with the most free slots; free slots keep what they held if it is
    not on the rank twice, else take a replica of the expert with the fewest."""
    new = [-1] * (new_spr * world)
    for rank in range(world):
        for j in range(min(old_spr, new_spr)):
            expert = old[rank * old_spr + j]
            if expert not in new[rank * new_spr:(rank + 1) * new_spr] and expert not in new:
                new[rank * new_spr + j] = expert
    for expert in (e for e in range(num_experts) if e not in new):
        free = [sum(new[r * new_spr + j] < 0 for j in range(new_spr)) for r in range(world)]
        rank = max(range(world), key=lambda r: (free[r], -r))
        new[rank * new_spr + next(j for j in range(new_spr) if new[rank * new_spr + j] < 0)] = expert
    replicas = Counter(e for e in new if e >= 0)
    for slot in (s for s in range(len(new)) if new[s] < 0):
        rank, j = divmod(slot, new_spr)
        on_rank = set(new[rank * new_spr:(rank + 1) * new_spr])
        held = old[rank * old_spr + j] if j < old_spr else -1
        if held < 0 or held in on_rank:
            held = min((e for e in range(num_experts) if e not in on_rank), key=lambda e: (replicas[e], e),
                       default=min(range(num_experts), key=lambda e: (replicas[e], e)))
        new[slot] = held
        replicas[held] += 1
    return new


def placeholders(compact: torch.Tensor, new: torch.Tensor, lost: list[set[int]], world: int) -> torch.Tensor:
    """`new` with every slot of a lost expert holding the first expert its own rank held (a local copy):
    the moves then only need sources that exist; the lost experts are loaded into those slots afterwards."""
    if new.numel() == 0:
        return new
    out = new.clone()
    old_spr, new_spr = compact.shape[1] // world, new.shape[1] // world
    for layer, missing in enumerate(lost):
        for slot, expert in enumerate(new[layer].tolist()):
            if expert in missing:
                out[layer, slot] = compact[layer, (slot // new_spr) * old_spr]
    return out


def move_to_survivors(layers: list[FusedMoE], compact: torch.Tensor, new: torch.Tensor, lost: list[set[int]],
                      layout: ParallelLayout, config: Any, groups: ParallelState | None) -> None:
    """Every layer to its slots over the survivors: experts a survivor holds are copied (locally or over
    the new group, moving only what changes); slots of lost experts get a local placeholder copy, to be
    overwritten by restore_experts."""
    world = layout.world_size
    expert_layout = ExpertLayout.for_ranks(config.model.arch.num_experts, config.parallel.num_redundant_experts,
                                           world, layout.rank)
    sources = placeholders(compact, new, lost, world)
    old_spr, new_spr = compact.shape[1] // world, new.shape[1] // world
    for moe, old_row, source_row, new_row in zip(layers, compact.tolist(), sources.tolist(), new):
        src, dst, target = _slots(moe, expert_layout)
        moves = plan_moves(old_row, old_spr, source_row, new_spr)
        execute_moves(moves, layout.rank, src, dst, groups.ep if groups is not None else None)
        target.set_placement(new_row)
        if target is not moe:
            moe.activate(target)


def _slots(moe: FusedMoE, layout: ExpertLayout) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                         tuple[torch.Tensor, torch.Tensor], Any]:
    """(the weights in force, the weights to fill for `layout`, what takes the placement). Layers that stage
    the next layout's slots beside the live ones fill the staged ones; otherwise the layer is re-laid out
    (its old tensors kept as the sources)."""
    if hasattr(moe, "stage"):
        staged = moe.stage(layout)
        return (moe.live.w13, moe.live.w2), (staged.w13, staged.w2), staged
    src = (moe.w13.data, moe.w2.data)
    moe.set_layout(layout)
    return src, (moe.w13.data, moe.w2.data), moe


def restore_experts(model: torch.nn.Module, layers: list[FusedMoE], lost: list[set[int]], config: Any) -> int:
    """Load the lost experts into this rank's slots that hold them now: from the checkpoint, or (dummy
    weights) fresh random ones at the same scale. Returns the slots written."""
    wanted = {id(moe): {e for e in missing if moe.needs_expert(e)} for moe, missing in zip(layers, lost)}
    if not any(wanted.values()):
        return 0
    if config.load_format == "dummy":
        written = 0
        gen = torch.Generator(device=layers[0].w13.device).manual_seed(config.seed)
        for moe in layers:
            local = moe.physical_to_logical[moe.first_slot:moe.first_slot + moe.slots_per_rank].tolist()
            for slot, expert in enumerate(local):
                if expert in wanted[id(moe)]:
                    moe.w13.data[slot].uniform_(-0.02, 0.02, generator=gen)
                    moe.w2.data[slot].uniform_(-0.02, 0.02, generator=gen)
                    written += 1
        return written
    return _load_from_checkpoint(model, wanted, config)


def _load_from_checkpoint(model: torch.nn.Module, wanted: dict[int, set[int]], config: Any) -> int:
    from safetensors import safe_open

    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    written = 0
    for path in checkpoint_files(Path(config.model)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                mapped = map_name(name, config.arch)
                if mapped is None or mapped[0] not in params or not mapped[0].rsplit(".", 1)[0] in modules:
                    continue
                param_name, kw = mapped
                moe = modules[param_name.rsplit(".", 1)[0]]
                if not isinstance(moe, FusedMoE) or not wanted.get(id(moe)):
                    continue
                if kw.pop("all_experts", False):  # one tensor with every expert
                    tensor = f.get_tensor(name)
                    for expert in wanted[id(moe)]:
                        params[param_name].weight_loader(params[param_name], tensor[expert], expert_id=expert,
                                                         shard_id=None)
                        written += 1
                elif kw.get("expert_id") in wanted[id(moe)]:
                    params[param_name].weight_loader(params[param_name], f.get_tensor(name), **kw)
                    written += 1
    return written
