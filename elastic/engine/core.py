"""The engine core: one device's scheduler + model runner. `step()` runs one batch and reports new tokens.

It speaks only in token ids and msgspec messages, so it runs the same in-process (`LLM`) or behind a
socket in its own process (the server).
"""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from elastic.config import EngineConfig
from elastic.distributed.expert_parallel import apply_expert_parallel
from elastic.distributed.parallel_state import ParallelState
from elastic.engine.block_manager import BlockManager
from elastic.engine.scheduler import Scheduler
from elastic.engine.waves import RequestWave
from elastic.executor.model_runner import ModelRunner
from elastic.protocol.from_engine import EngineCoreOutput, SchedulerStats
from elastic.protocol.to_engine import EngineCoreRequest
from elastic.request import Request, SchedulerOutput, check_inputs
from elastic.sampling_params import SamplingParams
from elastic.validation import validate_request

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, wave: RequestWave | None = None) -> None:
        self.config = config
        # With DP: whether any rank of this rank's request wave has unfinished requests (shared with DPWaves).
        self.wave = wave if wave is not None else RequestWave()
        self._failed: list[EngineCoreOutput] = []  # requests that failed alone, reported with the next step
        start = time.perf_counter()
        self.parallel: ParallelState | None = None
        if config.parallel.is_distributed:
            self.parallel = ParallelState(config.parallel, config.torch_device)
        self.runner = ModelRunner(config)
        if self.parallel is not None:
            apply_expert_parallel(self.runner.model, self.parallel.ep, config.parallel.ep_dispatch)
        num_blocks = self.runner.determine_num_blocks()
        if self.parallel is not None:  # every rank gets the same capacity: the smallest one measured
            num_blocks = int(self.parallel.dp.all_reduce(torch.tensor([num_blocks]), dist.ReduceOp.MIN))
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.capture_cuda_graphs()
        self.block_manager = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        logger.info("engine ready in %.1fs: %d KV blocks of %d tokens (%d tokens)", time.perf_counter() - start,
                    num_blocks, config.cache.block_size, num_blocks * config.cache.block_size)

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
            return self.scheduler.has_unfinished()
        return self.wave.running

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return [EngineCoreOutput(r.request_id, [], finish_reason="abort") for r in self.scheduler.abort(request_ids)]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def shutdown(self) -> None:
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
        return SchedulerStats(len(s.running), len(s.waiting), s.kv_cache_usage, s.num_preemptions)

    def step(self) -> list[EngineCoreOutput]:
        """One step. With data parallelism every rank must call this while `global_unfinished`: a rank
        without work runs a dummy batch so that the MoE collectives of all ranks match. A request whose
        inputs or sampling break fails alone (finish_reason "error"); the step and the others go on."""
        outputs = self._step()
        if self._failed:
            outputs, self._failed = self._failed + outputs, []
        return outputs

    def _fail(self, errors: dict[str, str]) -> None:
        for req in self.scheduler.abort(list(errors)):
            logger.error("request %s failed: %s", req.request_id, errors[req.request_id])
            self._failed.append(EngineCoreOutput(req.request_id, [], finish_reason="error",
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
        out = self.scheduler.schedule()
        self._screen(out)
        dp_num_tokens, graph_size = None, None
        if self.parallel is not None:
            decode_only = all(n == 1 for _, n in out.scheduled)
            dp_num_tokens, self.wave.running, all_decode = self.parallel.exchange_step(
                out.num_tokens or 1, self.scheduler.has_unfinished(), decode_only)
            if not self.wave.running:
                return []
            graph_size = self.runner.dp_graph_size(dp_num_tokens, all_decode)
            if not out:
                self.runner.dummy_run(1, dp_num_tokens=dp_num_tokens, graph_size=graph_size)
                return []
        elif not out:
            return []
        sampled, logprobs, failed = self.runner.execute(out, dp_num_tokens, graph_size)
        outputs = []
        for req in self.scheduler.postprocess(out, sampled):
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
        if failed:  # sampled nothing (postprocess skipped them): end them now
            self._fail(failed)
        return outputs
