"""Attention over the paged KV cache. The batch's layout comes from the forward context."""
from __future__ import annotations

import torch
from torch import nn

from elastic.forward_context import AttentionMetadata, get_forward_context


def store_kvcache_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    # key/value [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]; slot_mapping [T] (-1: skip)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q [Q, Hq, D]; k, v [S, Hkv, D]; the Q queries are the last Q of the S positions (causal).
    num_q, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)  # [S, Hq, D]
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q.float(), k) * scale  # [Hq, Q, S]
    q_pos = torch.arange(k.shape[0] - num_q, k.shape[0], device=q.device)
    mask = torch.arange(k.shape[0], device=q.device)[None, :] > q_pos[:, None]  # [Q, S]
    probs = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqs,shd->qhd", probs, v).to(q.dtype)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              md: AttentionMetadata, scale: float) -> torch.Tensor:
    """Plain torch, one request at a time, fp32 math: the semantics the GPU kernels must match."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    for b, seq_len in enumerate(md.seq_lens_cpu):
        start, end = md.query_start_loc_cpu[b], md.query_start_loc_cpu[b + 1]
        num_blocks = -(-seq_len // block_size)
        blocks = md.block_tables[b, :num_blocks].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len]  # [S, Hkv, D]
        v = v_cache[blocks].flatten(0, 1)[:seq_len]
        out[start:end] = _attend(q[start:end], k, v, scale)
    return out


class Attention(nn.Module):
    """Stores this step's K/V into the layer's cache, then attends over the cached context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # Bound by the model runner once the cache is allocated: [num_blocks, block_size, Hkv, D] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [T, Hq, D]; k, v [T, Hkv, D] -> [T, Hq, D]
        md = get_forward_context().attn
        if md is None:  # dummy/profiling run without a cache: only shapes and memory matter
            return v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        store_kvcache_reference(k, v, self.k_cache, self.v_cache, md.slot_mapping)
        return paged_attention_reference(q, self.k_cache, self.v_cache, md, self.scale)
