"""The inputs of CUDA graphs for mixed steps: prompt chunks, with or without decodes, padded to a token bucket.

An eager forward launches each layer's kernels from Python. On one H100 the Qwen3-30B-A3B shape's 1 024-token
prefill took 49 ms of host time, the device following it (benchmarks/eager_host.py, 2026-11-26), and with data
parallelism every rank steps eagerly while any rank prefills: a decoding rank beside it too. A graph replays
the whole forward in one launch, so the step takes the device's time. Steps are padded to the next bucket:
padded rows write no KV (slot -1), route to no expert (`num_valid`) and belong to no attention program (the
tile map lists each request's query tiles, then -1), so what they cost is their rows of the dense GEMMs.

Models whose attention has no tile-map kernel (MLA) keep eager mixed steps.
"""
from __future__ import annotations

import numpy as np
import torch

from elastic.forward_context import AttentionMetadata, ForwardContext
from elastic.kernels.attention import prefill_tile_map, prefill_tile_queries
from elastic.layers.pinned_copy import to_device

# Buckets up to the step budget: the padding stays within a third of the tokens above 512 (each graph costs
# ~50 ms to record at start-up and at every scale operation; its memory comes from the graphs' shared pool).
_BUCKETS = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768)


def mixed_sizes(max_tokens: int) -> list[int]:
    return sorted({s for s in _BUCKETS if s < max_tokens} | {max_tokens})


class MixedInputs:
    """Static buffers a mixed-step graph reads (prefixes of them per bucket), and how a step fills them."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, max_seq_len: int,
                 hidden_size: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device
                 ) -> None:
        self.sizes = mixed_sizes(max_tokens)
        self.max_seqs, self.max_seq_len, self.device = max_seqs, max_seq_len, device
        self.tile_queries = prefill_tile_queries(num_heads, num_kv_heads)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.tile_map = torch.full((self.programs(n), 2), -1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.num_valid = torch.zeros(1, dtype=torch.long, device=device)

    def programs(self, size: int) -> int:
        """Attention programs of a `size`-token bucket: every request's query tiles fit (one partial each)."""
        return -(-size // self.tile_queries) + self.max_seqs

    def size_for(self, num_tokens: int) -> int | None:
        return next((s for s in self.sizes if s >= num_tokens), None)

    def context(self, size: int, dp_size: int, staged: bool) -> ForwardContext:
        md = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables, query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens, max_query_len=size, max_seq_len=self.max_seq_len, query_start_loc_cpu=[],
            tile_map=self.tile_map[:self.programs(size)])
        return ForwardContext(attn=md, num_valid_tokens=self.num_valid,
                              dp_num_tokens=[size] * dp_size if dp_size > 1 else None, use_staged=staged)

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata | None, size: int) -> None:
        """A step's tokens and layout into the buffers (md None: no rows, a data-parallel rank keeping step)."""
        n = input_ids.shape[0]
        qsl = np.asarray(md.query_start_loc_cpu if md is not None else [0], dtype=np.int32)
        b = len(qsl) - 1
        if b > self.max_seqs:
            raise ValueError(f"{b} requests exceed the mixed-step graphs' {self.max_seqs}")
        padded_qsl = np.full(self.max_seqs + 1, n, dtype=np.int32)
        padded_qsl[:b + 1] = qsl
        tile_map = prefill_tile_map(padded_qsl, self.tile_queries, self.programs(size))
        self.query_start_loc.copy_(to_device(torch.from_numpy(padded_qsl), self.device))
        self.tile_map[:tile_map.shape[0]].copy_(to_device(torch.from_numpy(tile_map), self.device))
        if md is not None:
            self.input_ids[:n] = input_ids
            self.positions[:n] = positions
            self.slot_mapping[:n] = md.slot_mapping
            self.seq_lens[:b] = md.seq_lens
            self.block_tables[:b, :md.block_tables.shape[1]] = md.block_tables
        self.slot_mapping[n:size] = -1
        self.num_valid.fill_(n)
