"""Multi-head latent attention (DeepSeek-V2/V3) served from a latent paged cache.

Per token the cache holds c_kv (kv_lora_rank, after its RMSNorm) and the rotated rope key (qk_rope_head_dim),
shared by every head, instead of per-head K and V: 576 numbers per token and layer for DeepSeek-V2-Lite where
expanded K/V would take 16 x (192 + 128) = 5120. Attention never expands them: kv_b_proj's key half W_UK is
absorbed into the query (q_lat = q_nope W_UK, per head) and its value half W_UV into the output
(o = out_lat W_UV^T), so prefill and decode both attend over the cached latent rows directly.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from elastic.config.model_arch import ModelArch
from elastic.forward_context import get_forward_context
from elastic.kernels import mla_attention, store_latent
from elastic.layers.attention import PagedCacheLayer
from elastic.layers.linear import Linear, default_weight_loader
from elastic.layers.norm import RMSNorm
from elastic.layers.rotary import RotaryEmbedding, yarn_mscale

# transformers' DeepSeek q_a/kv_a norms keep RMSNorm's default eps whatever rms_norm_eps says.
_LATENT_NORM_EPS = 1e-6


def deinterleaved_rope_loader(num_heads: int, head_dim: int, rope_start: int) -> Callable[..., None]:
    """Weight loader for projections whose per-head rows [rope_start, head_dim) feed the rope: checkpoints
    rotate (x0, x1), (x2, x3)... pairs; reordering those rows to (x0, x2, ..., x1, x3, ...) at load makes the
    rotation the rotate-halves one (the same q.k, as q and k are reordered alike) at no cost per step."""
    rope = head_dim - rope_start
    # On the CPU explicitly: models are built under a `torch.device` context, checkpoint tensors come on the CPU.
    order = torch.cat([torch.arange(0, rope, 2, device="cpu"), torch.arange(1, rope, 2, device="cpu")]) + rope_start

    def load(param: nn.Parameter, loaded: torch.Tensor) -> None:
        per_head = loaded.reshape(num_heads, head_dim, *loaded.shape[1:]).clone()
        per_head[:, rope_start:] = per_head[:, order]
        default_weight_loader(param, per_head.reshape(loaded.shape))

    return load


class MlaAttention(PagedCacheLayer):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        mla = arch.mla
        assert mla is not None
        self.num_heads, self.mla = arch.num_heads, mla
        H, hidden = arch.num_heads, arch.hidden_size
        q_out = H * mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = Linear(hidden, q_out)
            q_rope_proj = self.q_proj
        else:
            self.q_a_proj = Linear(hidden, mla.q_lora_rank, bias=arch.qkv_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = Linear(mla.q_lora_rank, q_out)
            q_rope_proj = self.q_b_proj
        self.kv_a_proj_with_mqa = Linear(hidden, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=arch.qkv_bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = Linear(mla.kv_lora_rank, H * (mla.qk_nope_head_dim + mla.v_head_dim))
        self.o_proj = Linear(H * mla.v_head_dim, hidden, bias=arch.qkv_bias)
        if mla.rope_interleave:
            q_rope_proj.weight.weight_loader = deinterleaved_rope_loader(H, mla.qk_head_dim, mla.qk_nope_head_dim)
            for p in (self.kv_a_proj_with_mqa.weight, self.kv_a_proj_with_mqa.bias):
                if p is not None:
                    p.weight_loader = deinterleaved_rope_loader(1, mla.kv_lora_rank + mla.qk_rope_head_dim,
                                                                mla.kv_lora_rank)
        self.rotary = RotaryEmbedding(mla.qk_rope_head_dim, arch.max_position_embeddings, arch.rope_theta,
                                      arch.rope_scaling)
        self.scale = mla.qk_head_dim ** -0.5
        yarn = arch.rope_scaling
        if yarn is not None and yarn.mscale_all_dim:
            self.scale *= yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
        self.kv_cache = torch.empty(0)  # [num_blocks, block_size, C + R], bound by the model runner

    def kv_cache_shapes(self) -> list[tuple[int, ...]]:
        return [(self.mla.kv_lora_rank + self.mla.qk_rope_head_dim,)]

    def bind_kv_cache(self, caches: list[torch.Tensor]) -> None:
        (self.kv_cache,) = caches

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.mla.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x [T, hidden] -> [T, hidden]
        mla, H, T = self.mla, self.num_heads, x.shape[0]
        C, nope = mla.kv_lora_rank, mla.qk_nope_head_dim
        q_nope, q_pe = self._query(x).view(T, H, mla.qk_head_dim).split([nope, mla.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([C, mla.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)                                   # [T, C]
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe.unsqueeze(1))       # [T, H, R], [T, 1, R]
        w_kv = self.kv_b_proj.weight.view(H, nope + mla.v_head_dim, C)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_kv[:, :nope]).transpose(0, 1)   # [T, H, C]: W_UK absorbed
        md = get_forward_context().attn
        if md is None:  # dummy/profiling run without a cache: only shapes and memory matter
            out_lat = q_lat
        else:
            store_latent(c_kv, k_pe[:, 0], self.kv_cache, md.slot_mapping)
            out_lat = mla_attention(q_lat, q_pe, self.kv_cache, md.block_tables, md.query_start_loc, md.seq_lens,
                                    self.scale, md.max_query_len, md.max_seq_len)          # [T, H, C]
        out = torch.bmm(out_lat.transpose(0, 1), w_kv[:, nope:].transpose(1, 2))         # [H, T, v]: W_UV
        return self.o_proj(out.transpose(0, 1).reshape(T, H * mla.v_head_dim))
