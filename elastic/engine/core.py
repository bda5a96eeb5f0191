"""The engine core: one device's scheduler + model runner. `step()` runs one batch and reports new tokens.

It speaks only in token ids and msgspec messages, so it runs the same in-process (`LLM`) or behind a
socket in its own process (the server).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import weakref

import msgspec
import torch
import torch.distributed as dist

from elastic.config import EngineConfig
from elastic.distributed.expert_parallel import apply_expert_parallel
from elastic.distributed.group import StatelessGroup
from elastic.distributed.parallel_state import ParallelState
from elastic.engine.block_manager import BlockManager
from elastic.engine.phase_clock import PhaseClock
from elastic.engine.pipeline import DecodePipeline
from elastic.engine.reconfigure import (StagedLayout, parallel_config_for, recv_dense_weights, resize_placement,
                                        share_placement, transfer_experts)
from elastic.engine.scheduler import Scheduler
from elastic.engine.standby import Prewarmed
from elastic.engine.step_trace import StepTrace
from elastic.engine.waves import RequestWave
from elastic.eplb.balancer import ExpertBalancer, warm_up
from elastic.executor.cuda_graphs import StepGraph
from elastic.executor.model_runner import ModelRunner
from elastic.layers.moe import ExpertLayout
from elastic.protocol.from_engine import EngineCoreOutput, SchedulerStats, TokenLogprobs
from elastic.protocol.scaling import JoinInfo, ParallelLayout
from elastic.protocol.to_engine import EngineCoreRequest
from elastic.request import Request, SchedulerOutput, check_inputs
from elastic.sampling_params import SamplingParams
from elastic.validation import validate_request

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepAgreement:
    """What every DP rank agreed on for one step (a single rank: its own decisions)."""

    dp_num_tokens: list[int] | None  # every rank's token count (None: no data parallelism)
    graph: StepGraph | None  # the CUDA graph every rank replays, or None: eager
    plans_ready: bool  # every rank has the next expert placement computed: its moves may start


class EngineCore:
    def __init__(self, config: EngineConfig, wave: RequestWave | None = None, epoch: int = 0,
                 join: JoinInfo | None = None, prewarmed: Prewarmed | None = None) -> None:
        """Start-up in phases that elastic scaling runs again for the next layout (`stage`, beside serving,
        then `activate` at the switch): groups, expert slots and placement, KV budget agreement, CUDA graphs.
        `join`: this engine was started by a scale-up; its weights come from the serving ranks (no
        checkpoint read), and its graphs are captured together with their staged ones; `prewarmed`: what a
        standby engine built before it was claimed (engine/standby.py)."""
        self.config = config
        # With DP: whether any rank of this rank's request wave has unfinished requests (shared with DPWaves).
        self.wave = wave if wave is not None else RequestWave()
        # Reported with the next step: requests that failed alone, a pipelined step read early (`_settle`).
        self._owed: list[EngineCoreOutput] = []
        # Elastic scaling: `scale_hold` keeps rebalances from starting while an operation runs (its staged
        # slots are filled from the placement in force); `scale_sync` keeps this rank stepping while the
        # ranks go through an operation's agreed steps, and `scale_agree` is its vote, in the per-step DP
        # exchange, that it is ready for the next one (freeze the placement, or switch layouts).
        self.scale_hold = False
        self.scale_sync = False
        self.scale_agree = False
        # Fault recovery: set (by another thread) when a peer rank failed; a step under way is then void.
        self.peer_failed = threading.Event()
        clock = PhaseClock()
        p = config.parallel
        self.layout = ParallelLayout(epoch, p.data_parallel_size, p.data_parallel_rank, p.store_host, p.store_port)
        self.parallel: ParallelState | None = None
        if join is None:
            self._connect_groups()
            clock.mark("groups")
            self.runner = ModelRunner(config)
            clock.mark("model")
            self._connect_experts()
            self._set_up_communicator()
            clock.mark("experts")
            num_blocks = self._agree_kv_blocks(self.runner.determine_num_blocks())
            clock.mark("kv sizing")
        else:
            num_blocks = self._join(config, join, clock, prewarmed)
        self.balancer = self._make_balancer()
        if join is None:  # (a joining rank is on the scale's clock: a standby compiled them in its prewarm)
            self.runner.warm_up_moe_kernels()  # before the KV cache takes what the profile run set aside
            clock.mark("expert kernels")
        self.runner.allocate_kv_cache(num_blocks)
        clock.mark("kv allocation")
        self.runner.capture_cuda_graphs()
        clock.mark("graphs")
        if join is None:  # (a joining rank's collectives pair with the serving ranks' staging steps only)
            self.runner.warm_up_prefill()
            clock.mark("prefill kernels")
        self.block_manager = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        # (A proxy: the engine owns its pipeline, and with no cycle between them a dropped engine's GPU memory
        # is freed at once, not at the cycle collector's next pass.)
        self.pipeline = DecodePipeline(weakref.proxy(self)) if config.scheduler.async_scheduling else None
        self.trace = StepTrace.from_env()  # (ELASTIC_STEP_TRACE: performance work only)
        logger.info("engine ready in %.1fs (%s): %d KV blocks of %d tokens (%d tokens)", clock.total_s,
                    clock.summary(), num_blocks, config.cache.block_size, num_blocks * config.cache.block_size)

    def _join(self, config: EngineConfig, join: JoinInfo, clock: PhaseClock, prewarmed: Prewarmed | None) -> int:
        """Start-up of an engine started by a scale-up: random weights at the real shapes (no checkpoint
        read), replaced right away by the serving ranks' own. Returns the KV blocks it adopts."""
        own_blocks = None
        if prewarmed is not None and prewarmed.fits(config):
            self.runner, own_blocks = prewarmed.take(), prewarmed.num_blocks
        else:
            if prewarmed is not None:
                prewarmed.release()
            self.runner = ModelRunner(dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                                            load_format="dummy")))
        self.runner.config = config
        clock.mark("model")
        num_blocks = self._adopt_kv_blocks(join.num_kv_blocks, own_blocks)
        clock.mark("kv sizing")
        # Only now meet the serving ranks: each collective below pairs with one of their staging steps,
        # so nothing slow may come between them (engine/staging.py).
        self._connect_groups()
        clock.mark("groups")
        self._receive_weights(join)
        clock.mark("weights")
        self._set_up_communicator()  # pairs with the serving ranks' staging step `_connect`
        self._connect_experts()
        clock.mark("experts")
        return num_blocks

    # ---- start-up phases, re-run by reconfigure() ---------------------------------------------------------
    def _connect_groups(self) -> None:
        if self.layout.is_distributed:
            self.parallel = ParallelState(self.layout, self.config.torch_device)

    def _connect_experts(self) -> None:
        """Route every MoE layer through this layout's EP group (or none: a single rank computes locally)."""
        group = self.parallel.ep if self.parallel is not None else None
        apply_expert_parallel(self.runner.model, group, self.config.parallel.ep_dispatch,
                              p2p_capacity=self.config.scheduler.max_step_tokens)

    def _set_up_communicator(self) -> None:
        """One collective on the EP group now (every rank): NCCL sets its communicator up at the first one,
        which must not be a CUDA-graph capture (captures record collectives without running them)."""
        if self.parallel is not None:
            self.parallel.ep.barrier()

    def _agree_kv_blocks(self, num_blocks: int) -> int:
        """Every rank gets the same capacity: the smallest one measured (a joining rank offers the size the
        serving ranks have, which they cannot change while they hold requests)."""
        if self.parallel is not None:
            num_blocks = int(self.parallel.dp.all_reduce(torch.tensor([num_blocks]), dist.ReduceOp.MIN))
        return num_blocks

    def _adopt_kv_blocks(self, num_blocks: int, own: int | None = None) -> int:
        """A joining rank takes the serving ranks' KV size (they cannot shrink theirs while they hold
        requests) if it can hold it; measured before it joins the groups (profiling runs alone), unless a
        standby measured it already (`own`)."""
        own = self.runner.determine_num_blocks() if own is None else own
        if own < num_blocks:
            raise RuntimeError(f"this rank can hold {own} KV blocks; the serving ranks have {num_blocks}")
        return num_blocks

    def _receive_weights(self, join: JoinInfo) -> None:
        """A joining rank: non-expert weights from one serving rank, then its experts from all of them, in
        the order the serving ranks' staging sends them (engine/staging.py)."""
        assert self.parallel is not None
        recv_dense_weights(self.runner.model, self.parallel.ep, join.weights_from)
        old_p2l = share_placement(self.parallel.dp, None, self.parallel.ep.timeout.total_seconds())
        arch, redundant = self.config.model.arch, self.config.parallel.num_redundant_experts
        new_p2l = resize_placement(old_p2l, join.old_world_size, self.layout.world_size, arch.num_experts, redundant)
        moe = self.runner.model.moe_layers()
        transfer_experts(old_p2l, new_p2l, join.old_world_size, self.layout.world_size, self.layout.rank, None,
                         [m.live for m in moe], self.parallel.ep)

    # ---- elastic scaling: the switch to a layout staged beside the live one (engine/staging.py) ------------
    def activate(self, staged: StagedLayout) -> ParallelState | None:
        """The switch (blocking, at the step every rank agreed on): staged slots, groups, balancer and
        graphs become the live ones. Returns the replaced groups, for the caller to destroy once the switch
        is reported (tearing communicators down takes time nobody needs to wait for)."""
        self._settle()
        self.runner.release_cuda_graphs()  # they hold the old communicators and slot tensors
        for moe in self.runner.model.moe_layers():
            assert moe.staged is not None
            moe.activate(moe.staged)
        old_groups = self.parallel
        self.parallel, self.layout, self.balancer = staged.groups, staged.layout, staged.balancer
        self.config = self.runner.config = staged.config
        self.runner.graphs = staged.graphs
        if staged.graphs is not None:
            staged.graphs.staged = False  # the live ones now (an emulated replay reads the live slots)
        return old_groups if old_groups is not staged.groups else None

    def reconfigure(self, layout: ParallelLayout, groups: ParallelState | None, old_p2l: torch.Tensor,
                    new_p2l: torch.Tensor, transfer: StatelessGroup | None, old_world: int) -> None:
        """Switch to `layout` at once, serving nothing meanwhile (fault recovery: the live layout is broken):
        expert slots filled over `transfer` to the placement `new_p2l`, groups, KV agreement, balancer, CUDA
        graphs. Every rank of `transfer` calls it at the same point."""
        self._settle()
        self.runner.release_cuda_graphs()  # they reference the old communicators and slot tensors
        arch, redundant = self.config.model.arch, self.config.parallel.num_redundant_experts
        expert_layout = ExpertLayout.for_ranks(arch.num_experts, redundant, layout.world_size, layout.rank)
        moe = self.runner.model.moe_layers()
        staged = [m.stage(expert_layout) for m in moe]
        transfer_experts(old_p2l, new_p2l, old_world, layout.world_size, self.layout.rank, [m.live for m in moe],
                         staged, transfer, serving=False)
        for m in moe:
            m.activate(m.staged)
        if self.parallel is not None and self.parallel is not groups:
            self.parallel.destroy()
        self.parallel, self.layout = groups, layout
        parallel = parallel_config_for(self.config.parallel, layout)
        self.config = self.runner.config = dataclasses.replace(self.config, parallel=parallel)
        self._connect_experts()
        self._set_up_communicator()
        if self._agree_kv_blocks(self.num_kv_blocks) != self.num_kv_blocks:
            raise RuntimeError("ranks disagree on the KV cache size after a reconfiguration")
        self.balancer = self._make_balancer()  # the window's shape follows the number of slots
        self.runner.capture_cuda_graphs()

    def discard(self, staged: StagedLayout | None) -> None:
        """Drop a staged layout (a scale that rolls back): the live one serves on, untouched."""
        for moe in self.runner.model.moe_layers():
            moe.staged = None
        if staged is not None and staged.graphs is not None:
            staged.graphs.release()

    def leave(self) -> None:
        """This rank left (a scale-down; its experts went to the survivors while it prepared)."""
        self.shutdown()
        self.balancer = None

    def take_requests(self) -> list[Request]:
        """Remove every request without reporting it (they continue on another engine, from the tokens
        reported: a pipelined step's are dropped, and recomputed there)."""
        if self.pipeline is not None:
            self.pipeline.abandon()
        return self.scheduler.abort(list(self.scheduler.requests))

    def _make_balancer(self) -> ExpertBalancer | None:
        if not self.config.eplb.enable_eplb or not self.runner.model.moe_layers():
            return None
        rank, size = self.config.parallel.data_parallel_rank, self.config.parallel.data_parallel_size
        balancer = ExpertBalancer([m.live for m in self.runner.model.moe_layers()], self.config.eplb, rank, size,
                                  num_groups=self.config.model.arch.num_expert_groups)
        if self._ep_group is not None:
            warm_up(self._ep_group)  # NCCL's channels now, not in the first rebalance's stall
        return balancer

    @property
    def expert_slot_capacity(self) -> int | None:
        """Expert slots per layer this rank holds storage for (a scale-down within them needs no memory)."""
        moe = self.runner.model.moe_layers()
        return min(m.live.capacity for m in moe) if moe else None

    @property
    def num_kv_blocks(self) -> int:
        return self.block_manager.num_blocks

    def validate(self, req: EngineCoreRequest) -> None:
        """Raise ValueError for a request this engine could never finish."""
        validate_request(req.prompt_token_ids, req.sampling_params, self.config.model,
                         self.block_manager.num_blocks, self.config.cache.block_size, req.eos_token_id)

    def add_request(self, req: EngineCoreRequest) -> None:
        self.validate(req)
        self.scheduler.add(Request(req, self.runner.device))
        self.wave.running = True

    def start_wave(self) -> None:
        """Another rank got work: step (with dummy batches if need be) until the wave completes."""
        self.wave.running = True

    @property
    def global_unfinished(self) -> bool:
        """Whether this rank must keep stepping: it has work, or (with DP) another rank of its wave does."""
        if self.parallel is None:
            return self.scheduler.has_unfinished() or self._eplb_pending or self._pipelining
        return self.wave.running

    # ---- expert load balancing ------------------------------------------------------------------------
    @property
    def _eplb_pending(self) -> bool:
        """A rebalance is asked for or under way: steps must go on (dummy ones if need be) until it is done."""
        return self.balancer is not None and (self.balancer.busy or self.balancer.requested)

    @property
    def _ep_group(self) -> StatelessGroup | None:
        return self.parallel.ep if self.parallel is not None else None

    def request_rebalance(self, number: int | None = None) -> int:
        """Ask for rebalance `number` (default: the next one not yet started) at the next step; every rank
        of the group joins it. A caller waits until `eplb_state()['stats']` counts `number` rebalances done
        or skipped."""
        if self.balancer is None:
            raise RuntimeError("EPLB is off: start the engine with enable_eplb")
        number = self.balancer.started + 1 if number is None else int(number)
        self.balancer.request(number)
        if self.balancer.requested:
            self.wave.running = True
        return number

    def eplb_state(self) -> dict:
        if self.balancer is None:
            raise RuntimeError("EPLB is off: start the engine with enable_eplb")
        return self.balancer.describe()

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return [EngineCoreOutput(r.request_id, [], finish_reason="abort") for r in self.scheduler.abort(request_ids)]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._pipelining

    def launch_wait_s(self) -> float:
        """How long this engine can wait for inputs before its next step without idling the device: a
        pipelined step is on its way and the next launch is not due yet (engine/pipeline.py)."""
        return self.pipeline.launch_wait_s() if self.pipeline is not None else 0.0

    @property
    def _pipelining(self) -> bool:
        return self.pipeline is not None and self.pipeline.inflight is not None

    def _settle(self) -> None:
        """Read the pipelined step on its way (its outputs go with the next step): before anything that
        changes the layout or the requests under it."""
        if self.pipeline is None:
            return
        if not self.peer_failed.is_set():
            try:
                self._owed += self.pipeline.drain()
                return
            except Exception:  # a peer failed while it was read (the step's draws are put back)
                logger.warning("the pipelined step on its way failed as it was read", exc_info=True)
        self.pipeline.abandon()  # it ran beside a failed peer: computed again after the recovery

    def shutdown(self) -> None:
        self._settle()
        if self.trace is not None:
            self.trace.flush()
        # Graphs first: captured collectives reference the communicators that destroy() tears down.
        self.runner.release_cuda_graphs()
        if self.parallel is not None:
            self.parallel.destroy()
            self.parallel = None

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of `token_ids` (float32 [T, vocab]), using spare KV blocks briefly.
        Single-rank only: with expert parallelism every rank would have to join the forward."""
        if self.parallel is not None:
            raise RuntimeError("prompt_logits is not available with data_parallel_size > 1")
        req = Request(EngineCoreRequest("__prompt_logits__", token_ids, SamplingParams(max_tokens=1)),
                      self.runner.device)
        if not self.block_manager.allocate_slots(req, len(token_ids)):
            raise RuntimeError("not enough free KV blocks to score the prompt now")
        try:
            return self.runner.forward_logits(SchedulerOutput([(req, len(token_ids))]))
        finally:
            self.block_manager.free(req)

    def stats(self) -> SchedulerStats:
        s = self.scheduler
        eplb = msgspec.structs.replace(self.balancer.stats) if self.balancer is not None else None  # a snapshot
        return SchedulerStats(len(s.running), len(s.waiting), s.kv_cache_usage, s.num_preemptions, eplb,
                              dict(self.runner.steps_by_kind))

    def step(self) -> list[EngineCoreOutput]:
        """One step. With data parallelism every rank must call this while `global_unfinished`: a rank
        without work runs a dummy batch so that the MoE collectives of all ranks match. A request whose
        inputs or sampling break fails alone (finish_reason "error"); the step and the others go on."""
        outputs = self._step()
        if self._owed:
            outputs, self._owed = self._owed + outputs, []
        return outputs

    def _fail(self, errors: dict[str, str]) -> None:
        for req in self.scheduler.abort(list(errors)):
            logger.error("request %s failed: %s", req.request_id, errors[req.request_id])
            self._owed.append(EngineCoreOutput(req.request_id, [], finish_reason="error",
                                                 error=errors[req.request_id]))

    def _screen(self, out: SchedulerOutput) -> None:
        """Drop (and fail) scheduled requests whose inputs cannot be built, before the DP exchange: every
        rank's collectives then cover exactly what it runs."""
        model, errors = self.config.model, {}
        for req, num_new in out.scheduled:
            try:
                check_inputs(req, num_new, model.arch.vocab_size, model.max_model_len, self.config.cache.block_size)
            except Exception as e:
                errors[req.request_id] = f"the engine could not prepare this request: {e}"
        if errors:
            out.scheduled = [(r, n) for r, n in out.scheduled if r.request_id not in errors]
            self._fail(errors)

    def _step(self) -> list[EngineCoreOutput]:
        if self._pipelining:  # report the step on its way, having launched the next if still steady
            return self.pipeline.advance()  # type: ignore[union-attr]
        outputs = self._scheduled_step()
        if self.pipeline is not None:
            self.pipeline.start()
        return outputs

    def _scheduled_step(self) -> list[EngineCoreOutput]:
        out = self.scheduler.schedule()
        self._screen(out)
        agreed = self.agree_step(out.num_tokens, all(n == 1 for _, n in out.scheduled))
        if agreed is None:
            return []
        outputs = self._forward(out, agreed.dp_num_tokens, agreed.graph)
        self.after_step(agreed)
        return outputs

    def agree_step(self, num_tokens: int, decode_only: bool) -> StepAgreement | None:
        """Before a step of `num_tokens` (0: none scheduled): what every rank agreed on for it (with data
        parallelism, in the per-step exchange), having started a rebalance if one is due; None: no step now."""
        # No rebalance starts while a scale commit is pending (its moves would use the maps being replaced).
        eplb_due = self.balancer is not None and self.balancer.due() and not self.scale_hold
        plans_ready = self.balancer is not None and self.balancer.plan_ready
        agreed = StepAgreement(None, None, plans_ready)
        if self.parallel is not None:
            # A scale operation keeps every rank stepping until all are ready to freeze the placement or to
            # switch (no rebalance may be under way then); ParallelState.all_scale_ready says when.
            rebalancing = self.balancer is not None and self.balancer.busy
            scale_ready = self.scale_sync and self.scale_agree and not rebalancing
            has_work = self.scheduler.has_unfinished() or self._eplb_pending or self.scale_sync
            dp_num_tokens, self.wave.running, all_decode, eplb_due = self.parallel.exchange_step(
                num_tokens or 1, has_work, decode_only, eplb_due, scale_ready, plans_ready)
            if not self.wave.running:
                return None
            agreed = StepAgreement(dp_num_tokens, self.runner.dp_graph(dp_num_tokens, all_decode),
                                   self.parallel.all_eplb_plan_ready)
        elif not num_tokens and not self._eplb_pending:
            return None
        if self.trace is not None:
            self.trace.record(self.layout.rank, self.layout.epoch, num_tokens, decode_only, agreed.dp_num_tokens,
                              agreed.graph)
        if eplb_due:  # every rank of the EP group decided this at this same step
            self.balancer.begin(self._ep_group)
        return agreed

    def after_step(self, agreed: StepAgreement) -> None:
        """After a step's forward (launched, maybe not finished): the expert-load window, and one layer's moves of
        a rebalance under way."""
        if self.balancer is not None:
            self.balancer.record_step()
            self.balancer.advance(self._ep_group, agreed.plans_ready)

    def _forward(self, out: SchedulerOutput, dp_num_tokens: list[int] | None,
                 graph: StepGraph | None) -> list[EngineCoreOutput]:
        if not out:
            if self.parallel is not None:  # keep the MoE collectives of the other ranks company
                self.runner.idle_step(dp_num_tokens, graph)
            return []
        # Seeded requests' generators as before the step: a void step's draws are put back, so the tokens
        # computed again after a recovery are the ones an undisturbed run draws.
        seeded = [(r.generator, r.generator.get_state()) for r, _ in out.scheduled if r.generator is not None]
        try:
            sampled, logprobs, failed = self.runner.execute(out, dp_num_tokens, graph)
            if self.peer_failed.is_set():  # collectives aborted under this step: its tokens may be garbage
                raise RuntimeError("a peer rank failed during this step")
        except Exception:
            for generator, state in seeded:
                generator.set_state(state)
            raise
        outputs = self.report(self.scheduler.postprocess(out, sampled), logprobs)
        if failed:  # sampled nothing (postprocess skipped them): end them now
            self._fail(failed)
        return outputs

    def report(self, updated: list[Request], logprobs: dict[str, TokenLogprobs]) -> list[EngineCoreOutput]:
        """The outputs of requests a step gave a token (and maybe a finish)."""
        outputs = []
        for req in updated:
            lp = logprobs.get(req.request_id)
            prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None  # sent once, with the first token
            outputs.append(EngineCoreOutput(
                request_id=req.request_id,
                new_token_ids=[req.all_token_ids[-1]],
                new_logprobs=[lp] if lp is not None else None,
                prompt_logprobs=prompt_logprobs,
                finish_reason=req.finish_reason,
                stop_reason=req.stop_reason,
                num_cached_tokens=req.num_cached_tokens,
            ))
        return outputs
