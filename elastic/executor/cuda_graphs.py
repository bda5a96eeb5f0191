"""CUDA graphs for decode steps: one graph per batch size, captured at start-up, replayed each step; and for
mixed steps (prompt chunks), one per token bucket (mixed_graphs.py).

Decode runs tiny kernels per layer, so launch overhead rivals the work; a graph replays a whole forward
with one launch. A batch is padded up to the next captured size (padded rows write no KV: slot -1).
Elastic scaling captures the next layout's graphs beside the live ones (another thread, another stream)
and swaps them in at the switch.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import NamedTuple

import torch

from elastic.executor.mixed_graphs import MixedInputs
from elastic.forward_context import AttentionMetadata, ForwardContext, set_forward_context

logger = logging.getLogger(__name__)

# Set to 1: CPU engines "capture" graphs whose replays are eager forwards over the graphs' buffers (tests of
# the graph paths where CI has no GPU; never on CUDA).
EMULATE_ENV = "ELASTIC_EMULATE_CUDA_GRAPHS"


def capture_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes with a graph: powers of two to 16, then every 16 to 64, then every 32 (14 graphs up to 256).
    Padding rows cost little (they route to no expert slot and attend to one token), and each graph costs
    ~50 ms to record, which a scale operation waits for (the next layout's graphs)."""
    sizes = [1, 2, 4, 8, 16, 32, 48] + list(range(64, max_batch_size + 1, 32))
    return sorted({s for s in sizes if s <= max_batch_size} | {max_batch_size})


class StepGraph(NamedTuple):
    """Which graph a step replays (with data parallelism, every rank the same): a decode batch of `size`
    requests, or (`mixed`) a step of prompt chunks padded to `size` tokens (mixed_graphs.py)."""

    size: int
    mixed: bool = False


class StepGraphs:
    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_blocks_per_seq: int,
                 max_seq_len: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 dp_size: int = 1, staged: bool = False, mixed: MixedInputs | None = None) -> None:
        # With data parallelism every rank captures and replays the same sizes, so the expert-parallel
        # collectives inside the graphs pair up (each rank pads its batch to the common size).
        # `staged`: graphs of the next layout (elastic scaling), captured from a background thread over the
        # MoE layers' staged slots while this rank serves with the live graphs. `mixed`: also graphs of mixed
        # steps, reading these buffers.
        self.model, self.device, self.max_seq_len, self.dp_size = model, device, max_seq_len, dp_size
        self.staged, self.mixed = staged, mixed
        self.sizes = capture_sizes(max_batch_size)
        n = self.sizes[-1]
        # Static buffers: every decode graph reads its inputs from (prefixes of) these.
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.num_valid = torch.zeros(1, dtype=torch.long, device=device)  # real rows of this replay (expert load)
        self.graphs: dict[StepGraph, torch.cuda.CUDAGraph] = {}
        self.pool: object | None = None
        self.warm_up_layers: list[int] = model.warm_up_layers()
        self.warmup_s = 0.0  # of the capture time: eager warm-up runs (compiles) vs recording the graphs

    def keys(self) -> list[StepGraph]:
        """Every graph, largest first (smaller ones reuse its memory): mixed steps', then decode batches'."""
        mixed = [StepGraph(s, True) for s in reversed(self.mixed.sizes)] if self.mixed is not None else []
        return mixed + [StepGraph(s) for s in reversed(self.sizes)]

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
            max_query_len=1, max_seq_len=self.max_seq_len, query_start_loc_cpu=list(range(bs + 1)))

    @torch.inference_mode()
    def capture(self) -> None:
        if self.device.type != "cuda":  # EMULATE_ENV: every graph's replay is an eager forward (tests)
            self.graphs = {key: _EagerReplay(self, key) for key in self.keys()}  # type: ignore[misc]
            logger.info("emulating %d CUDA graphs on the CPU%s (%s)", len(self.graphs),
                        " for the next layout" if self.staged else "", EMULATE_ENV)
            return
        start = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        # A stream of our own (captures cannot use the legacy default stream). Staged graphs are captured while
        # another thread serves, so only this stream is waited for and only this thread's CUDA calls are
        # checked; no device-wide sync and cache release per graph either (torch.cuda.graph does both, which
        # would stall the serving thread once per size).
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        mode = "thread_local" if self.staged else "global"
        with torch.cuda.stream(side):
            for key in self.keys():
                self.graphs[key] = self._capture_one(key, side, mode)
        side.synchronize()
        total = time.perf_counter() - start
        mixed = f" and {len(self.mixed.sizes)} mixed-step graphs (up to {self.mixed.sizes[-1]} tokens)" if self.mixed else ""
        logger.info("captured %d decode CUDA graphs (batch 1..%d)%s%s in %.1fs (warm-up runs %.1fs, recording %.1fs)",
                    len(self.sizes), self.sizes[-1], mixed, " for the next layout, beside serving," if self.staged else "",
                    total, self.warmup_s, total - self.warmup_s)

    def _context(self, key: StepGraph) -> ForwardContext:
        if key.mixed:
            return self.mixed.context(key.size, self.dp_size, self.staged)  # type: ignore[union-attr]
        return ForwardContext(attn=self._metadata(key.size), num_valid_tokens=self.num_valid,
                              dp_num_tokens=[key.size] * self.dp_size if self.dp_size > 1 else None,
                              use_staged=self.staged)

    def _buffers(self, key: StepGraph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, positions, hidden) of the graph's family."""
        family = self.mixed if key.mixed else self
        return family.input_ids, family.positions, family.hidden  # type: ignore[union-attr]

    def _warm_up(self, key: StepGraph, side: torch.cuda.Stream) -> None:
        """Compiles (and autotunes) what a graph launches, with stand-in collectives: no rank waits for another.
        One layer of each kind launches every kernel shape the whole forward does; its output is thrown away."""
        started = time.perf_counter()
        input_ids, positions, _ = self._buffers(key)
        with set_forward_context(dataclasses.replace(self._context(key), stand_in_collectives=True)):
            self.model(input_ids[:key.size], positions[:key.size], layers=self.warm_up_layers)
        side.synchronize()
        self.warmup_s += time.perf_counter() - started

    def _capture_one(self, key: StepGraph, side: torch.cuda.Stream, mode: str) -> torch.cuda.CUDAGraph:
        # The warm-up, then the capture, which records the real collectives without running them.
        self._warm_up(key, side)
        input_ids, positions, hidden = self._buffers(key)
        graph = torch.cuda.CUDAGraph()
        with set_forward_context(self._context(key)):
            graph.capture_begin(pool=self.pool, capture_error_mode=mode)
            try:
                hidden[:key.size] = self.model(input_ids[:key.size], positions[:key.size])
            finally:
                graph.capture_end()
        return graph

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Only the warm-ups of every graph, none captured: a standby engine compiles the kernels of the layout
        it expects to join before it is asked to (the compiled kernels stay in this process and on disk)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for key in self.keys():
                self._warm_up(key, side)

    def release(self) -> None:
        self.graphs.clear()
        self.pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def choose(self, num_tokens: int, decode_only: bool) -> StepGraph | None:
        """The graph a step of `num_tokens` tokens replays (`decode_only`: one token per request), or None:
        eager."""
        if decode_only and num_tokens <= self.sizes[-1]:
            return StepGraph(next(s for s in self.sizes if s >= num_tokens))
        size = self.mixed.size_for(num_tokens) if self.mixed is not None else None
        return StepGraph(size, True) if size is not None else None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata | None,
            key: StepGraph) -> torch.Tensor:
        """Forward of a step's n tokens through graph `key` -> hidden [n, H] (a view of a static buffer). With
        md None and no rows the replay only keeps this rank in step with the others (data parallelism)."""
        n = input_ids.shape[0]
        if key.mixed:
            self.mixed.load(input_ids, positions, md, key.size)  # type: ignore[union-attr]
            self.graphs[key].replay()
            return self.mixed.hidden[:n]  # type: ignore[union-attr]
        bs = key.size
        if md is not None:
            self.input_ids[:n] = input_ids
            self.positions[:n] = positions
            self.slot_mapping[:n] = md.slot_mapping
            self.seq_lens[:n] = md.seq_lens
            self.block_tables[:n, :md.block_tables.shape[1]] = md.block_tables
        self.num_valid.fill_(n)
        self.slot_mapping[n:bs] = -1
        self.seq_lens[n:bs] = 1  # padded rows attend to one (garbage but finite) cached token
        self.block_tables[n:bs, 0] = 0
        self.graphs[key].replay()
        return self.hidden[:n]


class _EagerReplay:
    """A graph's stand-in on the CPU, where there are none (EMULATE_ENV=1; tests): replay() runs the forward
    eagerly over the same static buffers, padding and forward context that a capture records, so that the
    choice of graphs, their inputs and, with data parallelism, the agreement on them run in CI."""

    def __init__(self, graphs: StepGraphs, key: StepGraph) -> None:
        self.graphs, self.key = graphs, key

    def replay(self) -> None:
        graphs, size = self.graphs, self.key.size
        input_ids, positions, hidden = graphs._buffers(self.key)
        with set_forward_context(graphs._context(self.key)):
            hidden[:size] = graphs.model(input_ids[:size], positions[:size])
