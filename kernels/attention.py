"""Paged KV cache writes and paged attention: public API and torch references.

KV cache per layer: k_cache, v_cache [num_blocks, block_size, Hkv, D]; a token's slot is
block_id * block_size + offset. Request b owns query rows query_start_loc[b]:query_start_loc[b+1]
(q_len_b tokens): the LAST q_len_b positions of its seq_lens[b]-token context, whose K/V are
already in the cache. Each query attends causally to keys 0..its own position, read through
block_tables[b]. Query head h uses kv head h // (Hq // Hkv). Prefill, chunked prefill and decode
(q_len 1) all go through the same call. Output rows outside
query_start_loc[0]:query_start_loc[B] are not written by the Triton path (zeros in the reference).
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

from ._backend import cdiv, next_pow2, pdl, use_triton

_TRITON_DTYPES = (torch.bfloat16, torch.float16)
# Buffer allocator; tests swap in a NaN-filling one to prove no unwritten element is consumed.
_alloc = torch.empty
LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535          # CUDA limit of grid dimension 1

# Launch parameters, chosen from sweeps on an H200 (docs/kernels-notes.md). Decode is bandwidth
# bound: one kv head per program, its G query heads stacked as rows; enough programs come from
# splitting the context ("waves" = programs wanted per SM). two_phase: an unmasked loop over
# the keys every row sees, then a masked loop over the rest (pays in prefill, neutral in
# decode); kv_fastest: grid order with the kv head varying fastest (slightly better).
DECODE_CFG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "max_splits": 64,
              "min_tiles_per_split": 2, "waves": 4, "two_phase": False, "kv_fastest": True}
PREFILL_CFG = {"BLOCK_R": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3,
               "two_phase": True, "kv_fastest": True}


def store_kvcache_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [T, Hkv, D] -> cache rows at slot_mapping[T] (int64); slot -1 is skipped."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blk, off = slots // block_size, slots % block_size
    k_cache[blk, off] = key[keep].to(k_cache.dtype)
    v_cache[blk, off] = value[keep].to(v_cache.dtype)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [T, Hkv, D] -> cache rows at slot_mapping[T] (int64); slot -1 is skipped.
    Sync-free and graph-capturable on the Triton path."""
    T, Hkv, D = key.shape
    if T == 0:
        return
    if not use_triton(key):
        store_kvcache_reference(key, value, k_cache, v_cache, slot_mapping)
        return
    from .attention_triton import _store_kv_kernel

    assert key.stride(-1) == 1 and value.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must share a layout"
    _store_kv_kernel[(T,)](key, value, k_cache, v_cache, slot_mapping,
                           key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), Hkv, D,
                           BLOCK_SIZE=k_cache.shape[1], BLOCK_H=next_pow2(Hkv),
                           BLOCK_D=next_pow2(D), num_warps=4, **pdl(key))


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                              seq_lens: torch.Tensor, scale: float, max_query_len: int,
                              max_seq_len: int) -> torch.Tensor:
    """float32 math per request; q [T, Hq, D] -> [T, Hq, D] in q's dtype."""
    T, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q0, q1 = starts[b], starts[b + 1]
        n = q1 - q0
        if n == 0 or seq_len == 0:
            continue
        pos = torch.arange(seq_len, device=q.device)                       # [L]
        pages = block_tables[b, pos // block_size].long()
        k = k_cache[pages, pos % block_size].float().repeat_interleave(group, dim=1)  # [L,Hq,D]
        v = v_cache[pages, pos % block_size].float().repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k) * scale          # [Hq, n, L]
        q_pos = seq_len - n + torch.arange(n, device=q.device)                 # [n]
        s = s.masked_fill((pos[None, :] > q_pos[:, None])[None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)    # a row without keys yields zeros
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, v).to(q.dtype)
    return out


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4                                  # interpreter runs: keep grids tiny
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_split(num_reqs: int, num_kv_heads: int, max_seq_len: int,
                 device: torch.device, cfg: dict | None = None) -> int:
    """-> splits per (request, kv head) for num_reqs x num_kv_heads programs (cfg: DECODE_CFG's keys, default
    DECODE_CFG): enough programs for cfg's waves over the SMs, at most max_splits, and no more than max_seq_len's
    tiles allow. The kernels divide each request's actual context among them, on the device. Host ints only
    (graph-safe)."""
    cfg = DECODE_CFG if cfg is None else cfg
    tiles = max(1, cdiv(max_seq_len, cfg["BLOCK_N"]))
    # Rounded down: every split of every request is busy (the context is divided among them), so the grid is
    # B x heads x splits programs; rounding up would leave a last wave mostly empty.
    want = cfg["waves"] * _num_sms(device) // max(1, num_reqs * num_kv_heads)
    return max(1, min(want, cfg["max_splits"], cdiv(tiles, cfg["min_tiles_per_split"])))


def split_state(rows: int, width: int, num_splits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode's per-split partial states, for `rows` (token, head) pairs: acc [rows * splits, width] and
    (max, sum) [rows * splits, 2], float32."""
    return (_alloc(rows * num_splits, width, dtype=torch.float32, device=device),
            _alloc(rows * num_splits, 2, dtype=torch.float32, device=device))


def merge_splits(part_acc: torch.Tensor, part_ml: torch.Tensor, out: torch.Tensor, query_start_loc: torch.Tensor,
                 num_splits: int) -> None:
    """out [T, H, width] <- the splits' partial states of every (request, head), one program each."""
    from .attention_triton import _attn_merge_kernel

    B, H, width = query_start_loc.shape[0] - 1, out.shape[1], out.shape[2]
    _attn_merge_kernel[(B, H)](part_acc, part_ml, out, query_start_loc, H, num_splits, width, out.stride(0),
                               out.stride(1), BLOCK_S=next_pow2(num_splits), BLOCK_D=next_pow2(width), num_warps=4,
                               **pdl(out))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, max_query_len: int,
                    max_seq_len: int, out: Optional[torch.Tensor] = None,
                    tile_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [T, Hq, D], caches [num_blocks, block_size, Hkv, D], block_tables [B, max_blocks]
    int32, query_start_loc [B+1] int32, seq_lens [B] int32 -> [T, Hq, D] in q's dtype.

    max_query_len / max_seq_len are host-side upper bounds (>= every q_len / seq_len): they
    size the grids, so no device value is read on the host. max_query_len == 1 selects the
    split-KV decode kernels (graph-capturable); otherwise the tiled prefill kernel runs, one program
    per (request, tile of its queries) or, with `tile_map` ([programs, 2] int32, prefill_tile_map),
    one per row of the map: a grid that depends on no batch's layout (CUDA graphs of mixed steps).
    """
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    if not use_triton(q) or q.dtype not in _TRITON_DTYPES:
        ref = paged_attention_reference(q, k_cache, v_cache, block_tables, query_start_loc,
                                        seq_lens, scale, max_query_len, max_seq_len)
        return ref if out is None else out.copy_(ref)
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    assert Hq % Hkv == 0 and k_cache.stride() == v_cache.stride()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    if T == 0 or B == 0 or max_query_len == 0:
        return out
    g_pad = next_pow2(group)
    common = dict(BLOCK_SIZE=k_cache.shape[1], G_PAD=g_pad, BLOCK_D=next_pow2(D),
                  EVEN_D=next_pow2(D) == D)
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
               k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))
    qk_scale = scale * LOG2E
    args = (q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out)
    if max_query_len == 1:
        num_splits = decode_split(B, Hkv, max_seq_len, q.device)
        split = num_splits > 1
        part_acc, part_ml = split_state(B * Hq, D, num_splits, q.device) if split else (out, out)  # (else unused)
        _paged_decode(args, part_acc, part_ml, qk_scale, num_splits, strides, common)
        if split:
            merge_splits(part_acc, part_ml, out, query_start_loc, num_splits)
        return out
    _paged_prefill(args, tile_map, qk_scale, max_query_len, strides, common)
    return out


def _paged_prefill(args: tuple[torch.Tensor, ...], tile_map: Optional[torch.Tensor], qk_scale: float,
                   max_query_len: int, strides: tuple[int, ...], common: dict) -> None:
    """The prefill launch: one program per (tile of a request's queries, kv head), the whole context each; the
    programs are every request's tiles up to max_query_len's, or the tile map's rows."""
    from .attention_triton import _attn_fwd_kernel

    q, k_cache, seq_lens, out = args[0], args[1], args[5], args[6]
    B, Hq, D, Hkv = seq_lens.shape[0], q.shape[1], q.shape[2], k_cache.shape[2]
    cfg = PREFILL_CFG
    block_q = prefill_tile_queries(Hq, Hkv)
    tiles = cdiv(max_query_len, block_q)
    programs = B * tiles if tile_map is None else tile_map.shape[0]
    kv_fastest = cfg["kv_fastest"] and programs <= _MAX_GRID_Y
    grid = (Hkv, programs, 1) if kv_fastest else (programs, Hkv, 1)
    _attn_fwd_kernel[grid](
        *args, out, out, out if tile_map is None else tile_map, qk_scale, tiles, 1, Hq, Hq // Hkv, D, *strides,
        BLOCK_Q=block_q, BLOCK_R=block_q * common["G_PAD"], BLOCK_N=cfg["BLOCK_N"], SPLIT=False,  # one split
        TWO_PHASE=cfg["two_phase"], KV_FASTEST=kv_fastest, TILE_MAP=tile_map is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common, **pdl(q))


def prefill_tile_queries(num_heads: int, num_kv_heads: int) -> int:
    """Queries per program of the prefill kernel (its rows are (query, head of the kv group) pairs)."""
    g_pad = next_pow2(num_heads // num_kv_heads)
    return max(PREFILL_CFG["BLOCK_R"], g_pad) // g_pad


def prefill_tile_map(query_start_loc: np.ndarray, tile_queries: int, programs: int) -> np.ndarray:
    """The prefill kernel's programs for a batch whose request b owns query rows [query_start_loc[b],
    query_start_loc[b + 1]) -> int32 [programs, 2]: (b, query tile) per program, (-1, -1) past the last
    (every request's ceil(q_len / tile_queries) tiles; at most T / tile_queries + B of them). Host numpy."""
    q_lens = np.diff(np.asarray(query_start_loc, dtype=np.int64))
    tiles = -(-q_lens // tile_queries)  # [B]
    total = int(tiles.sum())
    if total > programs:
        raise ValueError(f"{total} query tiles do not fit a tile map of {programs}")
    out = np.full((programs, 2), -1, dtype=np.int32)
    out[:total, 0] = np.repeat(np.arange(len(q_lens)), tiles)
    out[:total, 1] = np.arange(total) - np.repeat(np.cumsum(tiles) - tiles, tiles)
    return out


def _paged_decode(args: tuple[torch.Tensor, ...], part_acc: torch.Tensor, part_ml: torch.Tensor, qk_scale: float,
                  num_splits: int, strides: tuple[int, ...], common: dict) -> None:
    """The decode launch: one program per (request, kv head, split); its rows are that kv head's query heads."""
    from .attention_triton import _attn_fwd_kernel

    q, k_cache, seq_lens = args[0], args[1], args[5]
    B, Hq, D = seq_lens.shape[0], q.shape[1], q.shape[2]
    Hkv = k_cache.shape[2]
    cfg = DECODE_CFG
    kv_fastest = cfg["kv_fastest"] and B <= _MAX_GRID_Y
    grid = (Hkv, B, num_splits) if kv_fastest else (B, Hkv, num_splits)
    _attn_fwd_kernel[grid](
        *args, part_acc, part_ml, part_acc, qk_scale, 1, num_splits, Hq, Hq // Hkv, D, *strides,
        BLOCK_Q=1, BLOCK_R=max(16, common["G_PAD"]), BLOCK_N=cfg["BLOCK_N"], SPLIT=num_splits > 1,
        TWO_PHASE=cfg["two_phase"], KV_FASTEST=kv_fastest, TILE_MAP=False,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common, **pdl(q))
