"""Owns the model, its KV cache and the sampler on one device; turns a scheduled batch into tokens."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import time

import numpy as np
import torch

from elastic.config import EngineConfig, ParallelConfig
from elastic.executor.cuda_graphs import EMULATE_ENV, StepGraph, StepGraphs
from elastic.executor.mixed_graphs import MixedInputs
from elastic.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from elastic.kernels import HAS_TRITON
from elastic.layers.attention import Attention, PagedCacheLayer
from elastic.layers.moe import Routing
from elastic.layers.pinned_copy import to_device
from elastic.layers.sampler import Sampler
from elastic.models.loader import load_model
from elastic.protocol.from_engine import TokenLogprobs
from elastic.protocol.to_engine import EngineCoreRequest
from elastic.request import Request, SchedulerOutput
from elastic.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How a step's forward ran (the labels of elastic:engine_steps_total).
STEP_DECODE_GRAPH, STEP_MIXED_GRAPH, STEP_EAGER = "decode_graph", "mixed_graph", "eager"

_CPU_DEFAULT_KV_BYTES = 1 << 30


@dataclasses.dataclass
class LaunchedDecode:
    """A decode step on its way: its tokens on the device (the next step's inputs) and their copies to the
    host, readable once `done` (a CUDA event; None on the CPU) has passed. `started` passes when the device
    begins the step's forward (after the step before it), so `device_seconds` is the step's own time."""

    tokens: torch.Tensor  # [B] int64, device
    host_tokens: torch.Tensor  # [B], pinned host memory on CUDA
    host_finite: torch.Tensor  # [B] bool
    started: torch.cuda.Event | None
    done: torch.cuda.Event | None
    generators: list[tuple[torch.Generator, torch.Tensor]]  # seeded rows' generators, and their state before

    @staticmethod
    def mark_start(device: torch.device) -> torch.cuda.Event | None:
        if device.type != "cuda":
            return None
        started = torch.cuda.Event(enable_timing=True)
        started.record()
        return started

    @classmethod
    def copy_back(cls, tokens: torch.Tensor, finite: torch.Tensor, started: torch.cuda.Event | None,
                  generators: list[tuple[torch.Generator, torch.Tensor]]) -> LaunchedDecode:
        if tokens.device.type != "cuda":
            return cls(tokens, tokens, finite, None, None, generators)
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_finite = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        host_finite.copy_(finite, non_blocking=True)
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        return cls(tokens, host_tokens, host_finite, started, done, generators)

    def undo_draws(self) -> None:
        """Seeded requests' generators as before this step (its tokens are dropped: another engine draws them
        again, from the state it is handed)."""
        for generator, state in self.generators:
            generator.set_state(state)

    def read(self) -> tuple[list[int], list[bool]]:
        """(tokens, whether each row's distribution was finite), waiting for this step only."""
        if self.done is not None:
            self.done.synchronize()
        return self.host_tokens.tolist(), self.host_finite.tolist()

    @property
    def device_seconds(self) -> float | None:
        """How long the device spent on the step (once read; None on the CPU)."""
        if self.started is None or self.done is None:
            return None
        return self.started.elapsed_time(self.done) / 1e3


def free_device_bytes(config: EngineConfig) -> int | None:
    """What this rank may still allocate under its memory cap (CUDA), for scale-down capacity checks.
    Memory the caching allocator holds but no tensor uses counts as free: it is reused before any new
    allocation (after a scale-up shrinks the expert slots, that is where their old memory sits)."""
    if config.torch_device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(config.torch_device).total_memory
    return max(0, int(total * config.cache.gpu_memory_utilization) - torch.cuda.memory_allocated(config.torch_device))


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device
        torch.manual_seed(config.model.seed)
        self.model = load_model(config.model, config.parallel, self.device)
        self.sampler = Sampler(self.device, config.model.seed)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedCacheLayer)]
        self.moe_layers = self.model.moe_layers()  # (modules stay; a new layout changes their slots)
        self.block_size = config.cache.block_size
        self.num_blocks = 0
        self.kv_caches: list[list[torch.Tensor]] = []
        self.graphs: StepGraphs | None = None
        # Forwards this runner ran, by how (cumulative; the engine's stats, elastic:engine_steps_total).
        self.steps_by_kind = {STEP_DECODE_GRAPH: 0, STEP_MIXED_GRAPH: 0, STEP_EAGER: 0}

    # ---- KV cache -------------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        # Each attention layer says what it caches per token (K and V, or MLA's one latent row).
        elem = torch.empty(0, dtype=self.config.model.dtype).element_size()
        per_token = sum(math.prod(shape) for layer in self.attention_layers for shape in layer.kv_cache_shapes())
        return self.block_size * per_token * elem

    def determine_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        per_block = self.kv_bytes_per_block()
        if self.device.type == "cuda":
            budget = cache.kv_cache_memory if cache.kv_cache_memory is not None else self._profile_free_memory()
        else:
            # Enough for every sequence at full length, but no more than the default budget.
            full = self.config.scheduler.max_num_seqs * self.config.model.max_model_len // self.block_size + 1
            budget = cache.kv_cache_memory or min(_CPU_DEFAULT_KV_BYTES, full * per_block)
        num_blocks = int(budget // per_block)
        if num_blocks < 2:
            raise RuntimeError(f"not enough memory for the KV cache: {budget / 2**20:.0f} MiB available, "
                               f"{per_block / 2**20:.2f} MiB per block; lower max_num_batched_tokens or raise "
                               "gpu_memory_utilization / kv_cache_memory")
        return num_blocks

    def _profile_free_memory(self) -> int:
        """Run the largest batch once without a cache; what is left under the utilisation cap is the KV budget."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = self.config.scheduler.max_num_batched_tokens
        self.dummy_run(num_tokens, num_logits=min(self.config.scheduler.max_num_seqs, num_tokens))
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        peak_extra = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        used = total - free
        budget = total * self.config.cache.gpu_memory_utilization - used - peak_extra
        logger.info("GPU memory: %.1f GiB total, %.1f GiB in use, activation peak %.2f GiB -> KV budget %.1f GiB",
                    total / 2**30, used / 2**30, peak_extra / 2**30, budget / 2**30)
        return max(int(budget), 0)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = []  # per attention layer: its cache tensors [num_blocks, block_size, ...]
        for layer in self.attention_layers:
            # Zeroed: masked positions still multiply cache values, and garbage could hold NaN.
            caches = [torch.zeros((num_blocks, self.block_size, *shape), dtype=self.config.model.dtype,
                                  device=self.device) for shape in layer.kv_cache_shapes()]
            layer.bind_kv_cache(caches)
            self.kv_caches.append(caches)
        self.num_blocks = num_blocks

    @torch.inference_mode()
    def warm_up_moe_kernels(self) -> None:
        """Compile the expert kernels for every token-count bucket a step can reach (CUDA): each bucket has its
        own launch configuration, compiled on first use, and without this the first prefill of each new size
        stalls for seconds (first requests' TTFT). The local experts see up to the step's token budget from
        every rank (expert parallelism)."""
        moe = self.moe_layers
        if self.device.type != "cuda" or not moe:
            return
        most = self.config.scheduler.max_num_batched_tokens * self.config.parallel.data_parallel_size
        sizes = sorted({min(1 << i, most) for i in range(most.bit_length() + 1)})  # 1, 2, 4, ..., most
        started = time.perf_counter()
        for num_tokens in sizes:
            moe[0].warm_up_backend(num_tokens)  # (every layer has the same shapes: one compiles for all)
        torch.cuda.synchronize(self.device)
        logger.info("expert kernels ready for %d token counts up to %d in %.1fs", len(sizes), most,
                    time.perf_counter() - started)

    def warm_up_prefill(self) -> None:
        """Prefill steps of dummy prompts through the KV cache, as serving runs them (a mixed-step graph, or
        eagerly without one; with expert parallelism every rank calls this at once): on CUDA it compiles the
        prefill kernels the profile run, which has no cache, leaves out (attention over the cache, the eager
        exchange). On one H100 the first burst of 16 requests after start-up took 5x the time to first token
        of the next burst (518 vs 103 ms mean), the expert kernels already compiled (session 8; with these
        warm-ups 11% more, session 9). Run on the CPU too (cheap there), so that every start-up takes the same
        collectives and the tests cover them."""
        if self.num_blocks < 4:  # (the same on every rank: they agreed on the KV size)
            return
        started = time.perf_counter()
        self.prefill_dummy()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            logger.info("prefill kernels ready in %.1fs", time.perf_counter() - started)

    @torch.inference_mode()
    def prefill_dummy(self) -> None:
        """Prefill dummy prompts into the first KV blocks (no request holds them yet), then zero them again, as
        allocated, and forget the expert load they counted. Two steps: one prompt whose token count is not a
        multiple of 16, then two whose total is (Triton compiles a variant per divisibility of its ints); one
        such prompt where a step holds one sequence (the mixed-step graphs hold no more than a step can)."""
        bs, world, used = self.block_size, self.config.parallel.data_parallel_size, 0
        params = SamplingParams(temperature=0, max_tokens=1)  # greedy: no draw from the sampler's generator
        second = (2 * bs, 2 * bs) if self.config.scheduler.max_num_seqs > 1 else (4 * bs,)
        for lengths in ((2 * bs + 3,), second):
            scheduled, first_block = [], 0
            for i, n in enumerate(lengths):
                req = Request(EngineCoreRequest(f"__warm_up_{i}__", [0] * n, params), self.device)
                req.block_table = list(range(first_block, first_block + math.ceil(n / bs)))
                first_block += len(req.block_table)
                scheduled.append((req, n))
            used = max(used, first_block)
            dp_num_tokens = [sum(lengths)] * world if world > 1 else None
            # The graph every rank agrees on (one rank: execute picks its own).
            graph = self.dp_graph(dp_num_tokens, all_decode=False) if dp_num_tokens else None
            self.execute(SchedulerOutput(scheduled), dp_num_tokens, graph)
        for caches in self.kv_caches:
            for cache in caches:
                cache[:used].zero_()
        for moe in self.moe_layers:
            moe.expert_load.zero_()

    def release_cuda_graphs(self) -> None:
        """Drop the graphs (they hold the expert-parallel communicators they were captured with)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def capture_cuda_graphs(self) -> None:
        """Capture decode graphs (CUDA). With expert parallelism only the all-gather dispatch can be
        captured (all-to-all needs its split sizes on the host); every rank must call this together."""
        self.release_cuda_graphs()
        self.graphs = self._capture(self.config.parallel, staged=False)

    def stage_cuda_graphs(self, parallel: ParallelConfig) -> StepGraphs | None:
        """The next layout's graphs (over the MoE layers' staged slots), captured from a background thread
        while the live graphs serve; every rank of the next layout calls this together."""
        return self._capture(parallel, staged=True)

    def _capture(self, parallel: ParallelConfig, staged: bool) -> StepGraphs | None:
        graphs = self._step_graphs(parallel, staged)
        if graphs is not None:
            graphs.capture()
        return graphs

    def warm_up_step_graphs(self) -> bool:
        """Compile every kernel the graphs of this layout launch, capturing none (a standby engine,
        before it joins: its MoE layers run with stand-in collectives). False if this layout has no graphs."""
        graphs = self._step_graphs(self.config.parallel, staged=False)
        if graphs is not None:
            graphs.warm_up()
        return graphs is not None

    def _step_graphs(self, parallel: ParallelConfig, staged: bool) -> StepGraphs | None:
        emulated = self.device.type == "cpu" and os.environ.get(EMULATE_ENV) == "1"  # (tests)
        if (self.device.type != "cuda" and not emulated) or self.config.cache.enforce_eager:
            return None
        if parallel.is_distributed and parallel.ep_dispatch == "alltoall":
            logger.info("no CUDA graphs: the all-to-all expert dispatch syncs with the host")
            return None
        if not emulated and (not HAS_TRITON or self.config.model.dtype not in (torch.bfloat16, torch.float16)):
            logger.info("no CUDA graphs: the Triton kernels need bf16/fp16 (the fp32 reference path syncs)")
            return None
        arch, max_len, sched = self.config.model.arch, self.config.model.max_model_len, self.config.scheduler
        max_blocks, dtype = -(-max_len // self.block_size), self.config.model.dtype
        mixed = None  # (MLA layers have no tile-map prefill kernel: their mixed steps stay eager)
        if self.config.cache.mixed_step_graphs and all(type(m) is Attention for m in self.attention_layers):
            mixed = MixedInputs(sched.max_num_batched_tokens, sched.max_num_seqs, max_blocks, max_len,
                                arch.hidden_size, arch.num_heads, arch.num_kv_heads, dtype, self.device)
        return StepGraphs(self.model, sched.max_graph_batch, max_blocks, max_len, arch.hidden_size, dtype,
                          self.device, parallel.data_parallel_size, staged, mixed)

    # ---- execution ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def dp_graph(self, dp_num_tokens: list[int], all_decode: bool) -> StepGraph | None:
        """The graph every DP rank replays this step (the same on every rank: from what all agreed on), or None
        to run eagerly."""
        if self.graphs is None or not self.graphs.graphs:
            return None
        return self.graphs.choose(max(dp_num_tokens), all_decode)

    def dummy_run(self, num_tokens: int, num_logits: int = 1) -> None:
        """A forward with no KV cache (memory profiling; with data parallelism every rank runs it alike)."""
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device) % self.config.model.max_model_len
        dp_num_tokens = None
        if self.config.parallel.is_distributed:
            dp_num_tokens = [num_tokens] * self.config.parallel.data_parallel_size
        with set_forward_context(ForwardContext(attn=None, record_expert_load=False, dp_num_tokens=dp_num_tokens)):
            hidden = self.model(input_ids, positions)
        self.model.compute_logits(hidden[:num_logits])

    @torch.inference_mode()
    def idle_step(self, dp_num_tokens: list[int], graph: StepGraph | None) -> None:
        """Nothing scheduled here while other data-parallel ranks step: join the step's MoE collectives. Where
        the step has a graph, replay it with padding only. Otherwise (an eager step: the step is too large for
        the graphs, or there are none) run only the MoE layers' exchanges, in the model's order, on one row of
        zero weight: the experts here still compute their share of the others' tokens, but none of the
        attention, norms and routing around them is launched. Eagerly, those launches kept this rank's host
        behind the prefilling rank's device: it waited at every layer's exchange (2 x H100, a 1 024-token
        prefill: ~0.4 ms a layer)."""
        self._count(graph)
        if graph is not None:
            empty = torch.empty(0, dtype=torch.long, device=self.device)
            self.graphs.run(empty, empty, None, graph)  # type: ignore[union-attr]
            return
        layers = self.moe_layers
        if not layers:
            return
        first = layers[0]
        hidden = torch.zeros(1, first.hidden_size, dtype=first.w13.dtype, device=self.device)
        weights = torch.zeros(1, first.top_k, dtype=torch.float32, device=self.device)
        physical = torch.arange(first.top_k, device=self.device).unsqueeze(0)  # real slots (every path sends
        # them somewhere), weight 0: they add nothing anywhere
        with set_forward_context(ForwardContext(attn=None, record_expert_load=False, dp_num_tokens=dp_num_tokens)):
            for moe in layers:
                moe.live.ep_comm(moe, moe.live, hidden, Routing(weights, physical))  # type: ignore[misc]

    def _prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        reqs = [req for req, _ in out.scheduled]
        num_new = np.fromiter((n for _, n in out.scheduled), dtype=np.int64, count=len(reqs))
        starts = np.fromiter((req.num_computed_tokens for req in reqs), dtype=np.int64, count=len(reqs))
        positions, md = self._metadata(reqs, starts, num_new)
        input_ids: list[int] = []
        logit_rows: list[int] = []  # rows whose hidden state yields a next token
        for row, req in enumerate(reqs):
            start, end = int(starts[row]), int(starts[row] + num_new[row])
            input_ids += req.all_token_ids[start:end]
            if end == req.num_tokens:
                logit_rows.append(md.query_start_loc_cpu[row + 1] - 1)
        return self._to_device(np.asarray(input_ids, dtype=np.int64), torch.long), positions, md, logit_rows

    def _to_device(self, values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return to_device(torch.from_numpy(values).to(dtype), self.device)

    def _metadata(self, reqs: list[Request], starts: np.ndarray, num_new: np.ndarray
                  ) -> tuple[torch.Tensor, AttentionMetadata]:
        """Positions [T] and attention metadata of `num_new[b]` tokens of each request from `starts[b]`.
        Host arrays are built with numpy: torch.tensor over nested lists converts every int alone (0.3 ms a
        decode step at 64 requests of 1k tokens, growing with the context) while the GPU waits."""
        ends = starts + num_new
        query_start_loc = np.zeros(len(reqs) + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start_loc[1:])
        # positions [T]: each request's start..end, concatenated
        positions = np.arange(query_start_loc[-1]) + np.repeat(starts - query_start_loc[:-1], num_new)
        table_lens = np.fromiter((len(req.block_table) for req in reqs), dtype=np.int64, count=len(reqs))
        block_tables = np.zeros((len(reqs), int(table_lens.max())), dtype=np.int32)  # [B, max blocks], 0-padded
        block_tables[np.arange(block_tables.shape[1]) < table_lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(req.block_table for req in reqs), dtype=np.int32, count=int(table_lens.sum()))
        bs = self.block_size
        token_rows = np.repeat(np.arange(len(reqs)), num_new)
        slot_mapping = block_tables[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        md = AttentionMetadata(
            slot_mapping=self._to_device(slot_mapping, torch.long),
            block_tables=self._to_device(block_tables, torch.int32),
            query_start_loc=self._to_device(query_start_loc, torch.int32),
            seq_lens=self._to_device(ends, torch.int32),
            max_query_len=int(num_new.max()),
            max_seq_len=int(ends.max()),
            query_start_loc_cpu=query_start_loc.tolist(),
        )
        return self._to_device(positions, torch.long), md

    @torch.inference_mode()
    def forward_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits at every scheduled position (float32 [T, vocab]): scoring and reference checks."""
        input_ids, positions, md, _ = self._prepare(out)
        with set_forward_context(ForwardContext(attn=md, record_expert_load=False)):
            return self.model.compute_logits(self.model(input_ids, positions))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, dp_num_tokens: list[int] | None = None, graph: StepGraph | None = None
                ) -> tuple[dict[str, int], dict[str, TokenLogprobs], dict[str, str]]:
        """Run one step; returns the sampled token (and logprobs) of each request that reached its end, and
        {request id: why} for requests whose sampling failed (they fail alone; see Sampler.sample)."""
        input_ids, positions, md, logit_rows = self._prepare(out)
        hidden = self._forward(input_ids, positions, md, dp_num_tokens, graph)
        self._prompt_logprobs(out, hidden, md.query_start_loc_cpu)
        sampling_reqs = [req for req, n in out.scheduled if req.num_computed_tokens + n == req.num_tokens]
        if not sampling_reqs:
            return {}, {}, {}
        logits = self.model.compute_logits(hidden[logit_rows])  # [B, vocab]
        tokens, logprobs, errors = self.sampler.sample(logits, sampling_reqs)  # a failing row fails alone
        sampled = {req.request_id: tok for req, tok in zip(sampling_reqs, tokens) if tok is not None}
        sampled_logprobs = {req.request_id: lp for req, lp in zip(sampling_reqs, logprobs) if lp is not None}
        return sampled, sampled_logprobs, {sampling_reqs[row].request_id: why for row, why in errors.items()}

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata,
                 dp_num_tokens: list[int] | None = None, graph: StepGraph | None = None) -> torch.Tensor:
        """-> hidden [T, H]: a CUDA graph's replay where one fits the step (with data parallelism: `graph`, the
        one every rank agreed on), else an eager forward."""
        if graph is None and self.graphs is not None and dp_num_tokens is None:
            graph = self.graphs.choose(len(input_ids), md.max_query_len == 1)
        self._count(graph)
        if graph is not None:
            return self.graphs.run(input_ids, positions, md, graph)  # type: ignore[union-attr]
        with set_forward_context(ForwardContext(attn=md, dp_num_tokens=dp_num_tokens)):
            return self.model(input_ids, positions)  # [T, hidden]

    def _count(self, graph: StepGraph | None) -> None:
        kind = STEP_EAGER if graph is None else STEP_MIXED_GRAPH if graph.mixed else STEP_DECODE_GRAPH
        self.steps_by_kind[kind] += 1

    @torch.inference_mode()
    def launch_decode(self, reqs: list[Request], offset: int, input_ids: torch.Tensor,
                      dp_num_tokens: list[int] | None = None, graph: StepGraph | None = None) -> LaunchedDecode:
        """A decode step of `reqs` (no penalties or logprobs), each at position num_computed_tokens + offset with
        its token in `input_ids` [B] (on the device: the previous step's, not read yet, when offset is 1),
        launched and not waited for: its tokens are copied to the host behind it (LaunchedDecode.read). The
        seeded requests' generators are saved first (`LaunchedDecode.undo_draws`). With data parallelism: the
        step's agreed shape (as for `execute`)."""
        starts = np.fromiter((r.num_computed_tokens + offset for r in reqs), dtype=np.int64, count=len(reqs))
        positions, md = self._metadata(reqs, starts, np.ones(len(reqs), dtype=np.int64))
        started = LaunchedDecode.mark_start(self.device)
        hidden = self._forward(input_ids, positions, md, dp_num_tokens, graph)
        generators = [(r.generator, r.generator.get_state()) for r in reqs if r.generator is not None]
        tokens, finite = self.sampler.sample_on_device(self.model.compute_logits(hidden), reqs)
        return LaunchedDecode.copy_back(tokens, finite, started, generators)

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor, query_start_loc: list[int]) -> None:
        """For requests that asked for prompt_logprobs: logprobs of each next prompt token in this chunk."""
        for b, (req, num_new) in enumerate(out.scheduled):
            n = req.params.prompt_logprobs
            start = req.num_computed_tokens
            if n is None or start >= req.num_prompt_tokens - 1:
                continue
            if start == 0:
                req.prompt_logprobs = [None]
            # Position p predicts prompt token p + 1; the last prompt position predicts the first output.
            end = min(start + num_new, req.num_prompt_tokens - 1)
            rows = hidden[query_start_loc[b]:query_start_loc[b] + end - start]
            logprobs = torch.log_softmax(self.model.compute_logits(rows), dim=-1)  # [R, vocab]
            targets = torch.tensor(req.prompt_token_ids[start + 1:end + 1], device=logprobs.device)
            target_lp = logprobs.gather(1, targets[:, None]).squeeze(1)
            ranks = (logprobs > target_lp[:, None]).sum(dim=-1) + 1
            top_lp, top_ids = logprobs.topk(n, dim=-1)
            for i in range(end - start):
                req.prompt_logprobs.append(TokenLogprobs(
                    [int(targets[i])] + top_ids[i].tolist(), [float(target_lp[i])] + top_lp[i].tolist(),
                    int(ranks[i])))
