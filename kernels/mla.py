"""Multi-head latent attention (DeepSeek-V2/V3) over a paged latent cache: public API and torch references.

Latent cache per layer: kv_cache [num_blocks, block_size, C + R]: each token's row holds its normalised
latent c_kv (C = kv_lora_rank) followed by its rotated rope key k_pe (R = qk_rope_head_dim), shared by
all heads; a token's slot is block_id * block_size + offset, as for the K/V cache.

Attention runs with the up-projections absorbed (every head reads the same C + R numbers per token):
    score(t, h, j) = (q_lat[t, h] . c_kv[j] + q_pe[t, h] . k_pe[j]) * scale
    out_lat[t, h]  = sum_j softmax_j(score) * c_kv[j]                              -> [T, H, C]
where q_lat = q_nope @ W_UK (per head) and the caller turns out_lat into values with W_UV. Batch layout
as paged_attention: request b owns query rows query_start_loc[b]:query_start_loc[b+1], the LAST q_len_b
positions of its seq_lens[b]-token context (already in the cache), each attending causally.
"""
from __future__ import annotations

import torch

from ._backend import cdiv, next_pow2, pdl, use_triton
from .attention import decode_split, merge_splits, split_state

_TRITON_DTYPES = (torch.bfloat16, torch.float16)
LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535

# Decode: one program per (request, block of BLOCK_H heads, context split); its rows are the heads, so
# each latent tile is read once for BLOCK_H heads. Prefill: rows are (token, head) pairs of BLOCK_Q tokens.
# Registers bound these: the fp32 accumulator is rows x next_pow2(C) (16 x 512 at decode).
DECODE_CFG = {"BLOCK_H": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "max_splits": 32,
              "min_tiles_per_split": 4, "waves": 2}
PREFILL_CFG = {"BLOCK_H": 16, "BLOCK_R": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}


def store_latent_reference(c_kv: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
    """c_kv [T, C], k_pe [T, R] -> kv_cache rows at slot_mapping[T] (int64); slot -1 is skipped."""
    C = c_kv.shape[-1]
    block_size = kv_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blk, off = slots // block_size, slots % block_size
    kv_cache[blk, off, :C] = c_kv[keep].to(kv_cache.dtype)
    kv_cache[blk, off, C:] = k_pe[keep].to(kv_cache.dtype)


def store_latent(c_kv: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """c_kv [T, C], k_pe [T, R] (rows may be strided) -> kv_cache rows at slot_mapping[T] (int64); slot -1
    is skipped. One sync-free, graph-capturable kernel on the Triton path."""
    T, C = c_kv.shape
    R = k_pe.shape[-1]
    assert kv_cache.shape[-1] == C + R, f"cache rows of {kv_cache.shape[-1]} cannot hold {C} + {R}"
    if T == 0:
        return
    if not use_triton(c_kv):
        store_latent_reference(c_kv, k_pe, kv_cache, slot_mapping)
        return
    from .mla_triton import _store_latent_kernel

    assert c_kv.stride(-1) == 1 and k_pe.stride(-1) == 1 and kv_cache.stride(-1) == 1
    _store_latent_kernel[(T,)](c_kv, k_pe, kv_cache, slot_mapping, c_kv.stride(0), k_pe.stride(0),
                               kv_cache.stride(0), kv_cache.stride(1), C, R, BLOCK_SIZE=kv_cache.shape[1],
                               BLOCK_C=next_pow2(C), BLOCK_P=next_pow2(R), num_warps=4, **pdl(c_kv))


def mla_attention_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, max_query_len: int, max_seq_len: int) -> torch.Tensor:
    """float32 math per request; q_lat [T, H, C], q_pe [T, H, R] -> [T, H, C] in q_lat's dtype."""
    T, H, C = q_lat.shape
    block_size = kv_cache.shape[1]
    out = torch.zeros(T, H, C, dtype=q_lat.dtype, device=q_lat.device)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q0, q1 = starts[b], starts[b + 1]
        n = q1 - q0
        if n == 0 or seq_len == 0:
            continue
        pos = torch.arange(seq_len, device=q_lat.device)
        rows = kv_cache[block_tables[b, pos // block_size].long(), pos % block_size].float()   # [L, C + R]
        latent, k_pe = rows[:, :C], rows[:, C:]
        s = (torch.einsum("qhc,kc->hqk", q_lat[q0:q1].float(), latent)
             + torch.einsum("qhr,kr->hqk", q_pe[q0:q1].float(), k_pe)) * scale                 # [H, n, L]
        q_pos = seq_len - n + torch.arange(n, device=q_lat.device)
        s = s.masked_fill((pos[None, :] > q_pos[:, None])[None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        out[q0:q1] = torch.einsum("hqk,kc->qhc", p, latent).to(q_lat.dtype)
    return out


def mla_decode_split(num_programs: int, max_seq_len: int, device: torch.device) -> int:
    """-> splits per (request, head block) for `num_programs` of them: enough programs for DECODE_CFG's waves
    over the GPU's SMs, at most max_splits, and no more than max_seq_len's tiles allow. The kernel divides
    each request's actual context among them (on the device). Host ints only."""
    return decode_split(num_programs, 1, max_seq_len, device, DECODE_CFG)


def mla_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_query_len: int,
                  max_seq_len: int) -> torch.Tensor:
    """q_lat [T, H, C], q_pe [T, H, R] (any strides with unit last stride), kv_cache [NB, BS, C + R],
    block_tables [B, max_blocks] int32, query_start_loc [B+1] int32, seq_lens [B] int32 -> [T, H, C].

    max_query_len / max_seq_len are host-side upper bounds that size the grids (no device value is read
    on the host); max_query_len == 1 selects the split-context decode path (graph-capturable)."""
    T, H, C = q_lat.shape
    R = q_pe.shape[-1]
    B = seq_lens.shape[0]
    assert kv_cache.shape[-1] == C + R
    if not use_triton(q_lat) or q_lat.dtype not in _TRITON_DTYPES:
        return mla_attention_reference(q_lat, q_pe, kv_cache, block_tables, query_start_loc, seq_lens, scale,
                                       max_query_len, max_seq_len)
    from .mla_triton import _mla_fwd_kernel

    if q_lat.stride(-1) != 1:
        q_lat = q_lat.contiguous()
    if q_pe.stride(-1) != 1:
        q_pe = q_pe.contiguous()
    out = torch.empty(T, H, C, dtype=q_lat.dtype, device=q_lat.device)
    if T == 0 or B == 0 or max_query_len == 0:
        return out
    decode = max_query_len == 1
    cfg = DECODE_CFG if decode else PREFILL_CFG
    block_h = min(next_pow2(H), cfg["BLOCK_H"])
    block_r = max(16, block_h) if decode else max(cfg["BLOCK_R"], block_h)
    block_q = block_r // block_h
    head_blocks = cdiv(H, block_h)
    tiles = 1 if decode else cdiv(max_query_len, block_q)
    num_splits = mla_decode_split(B * head_blocks, max_seq_len, q_lat.device) if decode else 1
    split = num_splits > 1
    part_acc, part_ml = split_state(B * H, C, num_splits, q_lat.device) if split else (out, out)  # (else unused)
    assert B * tiles <= 2**31 - 1 and head_blocks <= _MAX_GRID_Y and num_splits <= _MAX_GRID_Y
    _mla_fwd_kernel[(B * tiles, head_blocks, num_splits)](
        q_lat, q_pe, kv_cache, block_tables, query_start_loc, seq_lens, out, part_acc, part_ml,
        scale * LOG2E, tiles, num_splits, H, C, R,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        BLOCK_SIZE=kv_cache.shape[1], BLOCK_H=block_h, BLOCK_Q=block_q, BLOCK_R=block_r, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_C=next_pow2(C), BLOCK_P=max(16, next_pow2(R)), SPLIT=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl(q_lat))
    if split:
        merge_splits(part_acc, part_ml, out, query_start_loc, num_splits)
    return out
