"""Attention over the paged KV cache. The batch's layout comes from the forward context."""
from __future__ import annotations

import abc

import torch
from torch import nn

from elastic.forward_context import get_forward_context
from elastic.kernels import paged_attention, store_kvcache
from elastic.layers.norm import RMSNorm
from elastic.layers.rotary import RotaryEmbedding


class PagedCacheLayer(nn.Module, abc.ABC):
    """A layer owning paged KV-cache tensors. The model runner sizes and allocates the cache from
    kv_cache_shapes(), so each attention kind says what it stores per token (K and V, or MLA's one latent row)."""

    @abc.abstractmethod
    def kv_cache_shapes(self) -> list[tuple[int, ...]]:
        """Per-token shape of each cache tensor of this layer."""

    @abc.abstractmethod
    def bind_kv_cache(self, caches: list[torch.Tensor]) -> None:
        """caches: [num_blocks, block_size, *shape] per entry of kv_cache_shapes()."""


class Attention(PagedCacheLayer):
    """Stores this step's K/V into the layer's cache, then attends over the cached context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # Bound by the model runner once the cache is allocated: [num_blocks, block_size, Hkv, D] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def kv_cache_shapes(self) -> list[tuple[int, ...]]:
        return [(self.num_kv_heads, self.head_dim)] * 2

    def bind_kv_cache(self, caches: list[torch.Tensor]) -> None:
        self.k_cache, self.v_cache = caches

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None,
                rotary: RotaryEmbedding | None = None, qk_norms: tuple[RMSNorm, RMSNorm] | None = None
                ) -> torch.Tensor:
        # q [T, Hq, D]; k, v [T, Hkv, D] -> [T, Hq, D]. With `rotary` (and Qwen3's per-head `qk_norms`), q and
        # k are rotated here (positions [T]): on CUDA in the kernel that writes k and v into the cache.
        md = get_forward_context().attn
        if md is None:  # dummy/profiling run without a cache: only shapes and memory matter
            return v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        if rotary is not None:
            q = rotary.rotate_into_cache(positions, q, k, v, self.k_cache, self.v_cache, md.slot_mapping, qk_norms)
        else:
            store_kvcache(k, v, self.k_cache, self.v_cache, md.slot_mapping)
        return paged_attention(q, self.k_cache, self.v_cache, md.block_tables, md.query_start_loc, md.seq_lens,
                               self.scale, md.max_query_len, md.max_seq_len, tile_map=md.tile_map)
