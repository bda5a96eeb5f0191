"""CUDA graphs for decode steps: one graph per batch size, captured at start-up, replayed each step.

Decode runs tiny kernels per layer, so launch overhead rivals the work; a graph replays a whole forward
with one launch. A batch is padded up to the next captured size (padded rows write no KV: slot -1).
Elastic scaling captures the next layout's graphs beside the live ones (another thread, another stream)
and swaps them in at the switch.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from elastic.forward_context import AttentionMetadata, ForwardContext, set_forward_context

logger = logging.getLogger(__name__)


def capture_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes with a graph: powers of two to 16, then every 16 to 64, then every 32 (14 graphs up to 256).
    Padding rows cost little (they route to no expert slot and attend to one token), and each graph costs
    ~50 ms to record, which a scale operation waits for (the next layout's graphs)."""
    sizes = [1, 2, 4, 8, 16, 32, 48] + list(range(64, max_batch_size + 1, 32))
    return sorted({s for s in sizes if s <= max_batch_size} | {max_batch_size})


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_blocks_per_seq: int,
                 max_seq_len: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 dp_size: int = 1, staged: bool = False) -> None:
        # With data parallelism every rank captures and replays the same sizes, so the expert-parallel
        # collectives inside the graphs pair up (each rank pads its batch to the common size).
        # `staged`: graphs of the next layout (elastic scaling), captured from a background thread over the
        # MoE layers' staged slots while this rank serves with the live graphs.
        self.model, self.device, self.max_seq_len, self.dp_size = model, device, max_seq_len, dp_size
        self.staged = staged
        self.sizes = capture_sizes(max_batch_size)
        n = self.sizes[-1]
        # Static buffers: every graph reads its inputs from (prefixes of) these.
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.num_valid = torch.zeros(1, dtype=torch.long, device=device)  # real rows of this replay (expert load)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: object | None = None
        self.warm_up_layers: list[int] = model.warm_up_layers()
        self.warmup_s = 0.0  # of the capture time: eager warm-up runs (compiles) vs recording the graphs

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
            max_query_len=1, max_seq_len=self.max_seq_len, query_start_loc_cpu=list(range(bs + 1)))

    @torch.inference_mode()
    def capture(self) -> None:
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
            for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
                self.graphs[bs] = self._capture_size(bs, side, mode)
        side.synchronize()
        total = time.perf_counter() - start
        logger.info("captured %d decode CUDA graphs (batch 1..%d)%s in %.1fs (warm-up runs %.1fs, recording %.1fs)",
                    len(self.graphs), self.sizes[-1], " for the next layout, beside serving," if self.staged else "",
                    total, self.warmup_s, total - self.warmup_s)

    def _context(self, bs: int) -> ForwardContext:
        return ForwardContext(attn=self._metadata(bs), num_valid_tokens=self.num_valid,
                              dp_num_tokens=[bs] * self.dp_size if self.dp_size > 1 else None, use_staged=self.staged)

    def _warm_up(self, bs: int, side: torch.cuda.Stream) -> None:
        """Compiles (and autotunes) what a batch of `bs` launches, with stand-in collectives: no rank waits for
        another. One layer of each kind launches every kernel shape the whole forward does; its output is
        thrown away."""
        started = time.perf_counter()
        with set_forward_context(dataclasses.replace(self._context(bs), stand_in_collectives=True)):
            self.model(self.input_ids[:bs], self.positions[:bs], layers=self.warm_up_layers)
        side.synchronize()
        self.warmup_s += time.perf_counter() - started

    def _capture_size(self, bs: int, side: torch.cuda.Stream, mode: str) -> torch.cuda.CUDAGraph:
        # The warm-up, then the capture, which records the real collectives without running them.
        self._warm_up(bs, side)
        graph = torch.cuda.CUDAGraph()
        with set_forward_context(self._context(bs)):
            graph.capture_begin(pool=self.pool, capture_error_mode=mode)
            try:
                self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])
            finally:
                graph.capture_end()
        return graph

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Only the warm-ups of every size, no graph: a standby engine compiles the kernels of the layout it
        expects to join before it is asked to (the compiled kernels stay in this process and on disk)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for bs in reversed(self.sizes):
                self._warm_up(bs, side)

    def release(self) -> None:
        self.graphs.clear()
        self.pool = None
        torch.cuda.empty_cache()

    def can_run(self, num_tokens: int, max_query_len: int) -> bool:
        return bool(self.graphs) and max_query_len == 1 and num_tokens <= self.sizes[-1]

    def size_for(self, num_tokens: int) -> int:
        return next(s for s in self.sizes if s >= num_tokens)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata | None,
            batch_size: int | None = None) -> torch.Tensor:
        """Decode forward of n requests (one token each) -> hidden [n, H] (a view of a static buffer).
        `batch_size` forces the graph (data parallelism: the size every rank agreed on); with md None
        and no rows the replay only keeps this rank in step with the others."""
        n = input_ids.shape[0]
        bs = batch_size or self.size_for(n)
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
        self.graphs[bs].replay()
        return self.hidden[:n]
