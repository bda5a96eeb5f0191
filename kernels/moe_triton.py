"""Triton kernels of the fused MoE layer (imported lazily: needs triton).

Pipeline for T tokens routed to K slots each (P = T*K (token, k) pairs):
  1. align:  group pair ids by slot into BLOCK_M-row blocks, each block owned by one slot
             (`sorted_ids[num_blocks*BLOCK_M]`, padding rows hold the sentinel P;
             `block_slot[num_blocks]`, -1 for blocks past the data-dependent end).
  2. up:     inter[row] = silu(x @ Wg^T) * (x @ Wu^T) for every row of every block
             (grouped GEMM over slots, SiLU-and-mul in the epilogue).
  3. down:   pair_out[pair] = topk_weight[pair] * inter[row] @ W2^T.
  4. sum:    out[t] = sum of pair_out over t's K pairs whose slot is >= 0 (the expert-parallel
             exchange does this sum itself as it sends results back: fused_moe_pairs).
All grids are sized from host-known upper bounds (T, K, S, BLOCK_M), never from data, so the
whole layer runs without a host sync and can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._backend import cdiv, next_pow2, pdl
from .moe_config import MoEConfig
from .pdl_triton import pdl_enter

# Buffer allocator; tests swap in a NaN-filling one to prove no unwritten element is consumed.
_alloc = torch.empty

# Up to this many (token, k) pairs one program aligns everything; beyond, three kernels
# spread the counting and scattering over many programs.
_ONE_CTA_MAX_PAIRS = 4096


def max_num_blocks(num_pairs: int, num_slots: int, block_m: int) -> int:
    """Upper bound of sum_s ceil(count_s / BLOCK_M) over slots: at most min(S, P) slots are
    non-empty and each wastes at most BLOCK_M - 1 padding rows."""
    return (num_pairs + min(num_slots, num_pairs) * (block_m - 1)) // block_m


@triton.jit
def _write_block_table(counts, pstart, pend, S, num_blocks, sorted_ids_ptr, block_slot_ptr,
                       sentinel, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_B: tl.constexpr):
    """Write block -> slot and the sentinel into each block's padding rows.
    counts/pstart/pend: [BLOCK_S] per-slot row count, padded start, padded end."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_M)
    for b0 in range(0, num_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)                        # [BLOCK_B]
        b_ok = offs_b < num_blocks
        row0 = offs_b * BLOCK_M
        # pend is non-decreasing, so the owner of row0 is the number of slots ending at or
        # before it (empty slots have pend == pstart and are skipped over).
        slot = tl.sum((pend[None, :] <= row0[:, None]).to(tl.int32), axis=1)
        is_real = slot < S
        sel = offs_s[None, :] == slot[:, None]                    # [BLOCK_B, BLOCK_S]
        cnt = tl.sum(tl.where(sel, counts[None, :], 0), axis=1)
        start = tl.sum(tl.where(sel, pstart[None, :], 0), axis=1)
        n_real = cnt - (row0 - start)                              # real rows from row0 on
        tl.store(block_slot_ptr + offs_b, tl.where(is_real, slot, -1), mask=b_ok)
        pad = (offs_r[None, :] >= n_real[:, None]) & (is_real & b_ok)[:, None]
        fill = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.int32) + sentinel
        tl.store(sorted_ids_ptr + row0[:, None] + offs_r[None, :], fill, mask=pad)


@triton.jit(do_not_specialize=["P", "num_blocks"])
def _moe_align_one_cta_kernel(slots_ptr, cursor_ptr, sorted_ids_ptr, block_slot_ptr, P, S,
                              num_blocks, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
                              BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Whole alignment in one program (one launch: what small batches want)."""
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    align_in_one_program(slots_ptr, cursor_ptr, sorted_ids_ptr, block_slot_ptr, P, S, num_blocks, BLOCK_M, BLOCK,
                         BLOCK_S, BLOCK_B)


@triton.jit
def align_in_one_program(slots_ptr, cursor_ptr, sorted_ids_ptr, block_slot_ptr, P, S, num_blocks,
                         BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    # The whole alignment of slots [P] (int32, < 0 or >= S: skipped) by the calling program; cursor [S] scratch.
    # (Also the tail of the expert-parallel dispatch kernel, once every rank's slot ids are in.)
    offs_s = tl.arange(0, BLOCK_S)
    counts = tl.zeros([BLOCK_S], dtype=tl.int32)
    skipped = tl.zeros([BLOCK], dtype=tl.int32)
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        slot = tl.load(slots_ptr + offs, mask=offs < P, other=-1)
        ok = (slot >= 0) & (slot < S)
        # skipped pairs land in bin 0 and are taken out again below
        counts += tl.histogram(tl.where(ok, slot, 0), BLOCK_S)
        skipped += (~ok).to(tl.int32)
    counts -= tl.where(offs_s == 0, tl.sum(skipped, axis=0), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pend = tl.cumsum(padded, axis=0)
    pstart = pend - padded
    tl.store(cursor_ptr + offs_s, pstart, mask=offs_s < S)
    _write_block_table(counts, pstart, pend, S, num_blocks, sorted_ids_ptr, block_slot_ptr,
                       P, BLOCK_M, BLOCK_S, BLOCK_B)
    tl.debug_barrier()          # cursors stored above must be visible to every thread's atomics
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        slot = tl.load(slots_ptr + offs, mask=offs < P, other=-1)
        ok = (slot >= 0) & (slot < S)
        pos = tl.atomic_add(cursor_ptr + slot, 1, mask=ok)
        tl.store(sorted_ids_ptr + pos, offs, mask=ok)


@triton.jit(do_not_specialize=["P"])
def _moe_count_kernel(slots_ptr, counts_ptr, P, S, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slots_ptr + offs, mask=offs < P, other=-1)
    tl.atomic_add(counts_ptr + slot, 1, mask=(slot >= 0) & (slot < S))


@triton.jit(do_not_specialize=["P", "num_blocks"])
def _moe_offsets_kernel(counts_ptr, cursor_ptr, sorted_ids_ptr, block_slot_ptr, P, S,
                        num_blocks, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_B: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    offs_s = tl.arange(0, BLOCK_S)
    counts = tl.load(counts_ptr + offs_s, mask=offs_s < S, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pend = tl.cumsum(padded, axis=0)
    pstart = pend - padded
    tl.store(cursor_ptr + offs_s, pstart, mask=offs_s < S)
    _write_block_table(counts, pstart, pend, S, num_blocks, sorted_ids_ptr, block_slot_ptr,
                       P, BLOCK_M, BLOCK_S, BLOCK_B)


@triton.jit(do_not_specialize=["P"])
def _moe_scatter_kernel(slots_ptr, cursor_ptr, sorted_ids_ptr, P, S, BLOCK: tl.constexpr,
                        USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    # Order inside a slot is whatever the atomics give; results do not depend on it because
    # every GEMM row is computed independently of the other rows of its tile.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slots_ptr + offs, mask=offs < P, other=-1)
    ok = (slot >= 0) & (slot < S)
    pos = tl.atomic_add(cursor_ptr + slot, 1, mask=ok)
    tl.store(sorted_ids_ptr + pos, offs, mask=ok)


@dataclass(frozen=True)
class Alignment:
    """The outputs of aligning P (token, k) pairs over S slots in BLOCK_M-row blocks (sorted_ids [nb*BLOCK_M],
    block_slot [nb], int32; cursor [S] scratch) and the one-program align's shapes: what the up and down
    GEMMs read, for a kernel that aligns as it ends (the expert-parallel dispatch)."""

    sorted_ids: torch.Tensor
    block_slot: torch.Tensor
    cursor: torch.Tensor
    num_pairs: int
    num_slots: int
    block_m: int

    @staticmethod
    def empty(num_pairs: int, num_slots: int, block_m: int, device: torch.device) -> Alignment:
        nb = max_num_blocks(num_pairs, num_slots, block_m)
        return Alignment(_alloc(nb * block_m, dtype=torch.int32, device=device),
                         _alloc(nb, dtype=torch.int32, device=device),
                         _alloc(num_slots, dtype=torch.int32, device=device), num_pairs, num_slots, block_m)

    @staticmethod
    def fits_one_program(num_pairs: int) -> bool:
        return num_pairs <= _ONE_CTA_MAX_PAIRS

    @property
    def in_one_program(self) -> bool:
        return self.fits_one_program(self.num_pairs)

    def args(self) -> tuple:
        """(cursor, sorted_ids, block_slot, P, S, num_blocks) of align_in_one_program."""
        return (self.cursor, self.sorted_ids, self.block_slot, self.num_pairs, self.num_slots,
                self.block_slot.shape[0])

    def meta(self) -> dict:
        """Its constexprs (BLOCK_M, BLOCK, BLOCK_S, BLOCK_B)."""
        block_s = next_pow2(self.num_slots)
        block_b = max(1, min(next_pow2(self.block_slot.shape[0]), 8192 // max(block_s, self.block_m)))
        return dict(BLOCK_M=self.block_m, BLOCK=min(1024, next_pow2(self.num_pairs)), BLOCK_S=block_s,
                    BLOCK_B=block_b)


def moe_align(topk_slots: torch.Tensor, num_slots: int,
              block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_slots [T, K] int32 -> (sorted_ids [nb*BLOCK_M] int32, block_slot [nb] int32)."""
    slots = topk_slots.reshape(-1)
    if slots.dtype != torch.int32 or not slots.is_contiguous():
        slots = slots.to(torch.int32).contiguous()
    P = slots.numel()
    dev = slots.device
    plan = Alignment.empty(P, num_slots, block_m, dev)
    sorted_ids, block_slot, cursor, nb = plan.sorted_ids, plan.block_slot, plan.cursor, plan.block_slot.shape[0]
    meta = plan.meta()
    block_s, block_b = meta["BLOCK_S"], meta["BLOCK_B"]
    if plan.in_one_program:
        _moe_align_one_cta_kernel[(1,)](slots, *plan.args(), **meta, num_warps=8, **pdl(slots))
        return sorted_ids, block_slot
    counts = torch.zeros(num_slots, dtype=torch.int32, device=dev)
    grid = (cdiv(P, 1024),)
    _moe_count_kernel[grid](slots, counts, P, num_slots, BLOCK=1024, num_warps=4, **pdl(slots))
    _moe_offsets_kernel[(1,)](counts, cursor, sorted_ids, block_slot, P, num_slots, nb,
                              BLOCK_M=block_m, BLOCK_S=block_s, BLOCK_B=block_b, num_warps=8, **pdl(slots))
    _moe_scatter_kernel[grid](slots, cursor, sorted_ids, P, num_slots, BLOCK=1024, num_warps=4, **pdl(slots))
    return sorted_ids, block_slot


@triton.jit
def _tile_of(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row blocks share each weight tile while it is in L2.
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["P", "top_k", "num_pid_m"])
def _moe_up_kernel(x_ptr, w_ptr, out_ptr, sorted_ids_ptr, block_slot_ptr,
                   P, top_k, N, K, num_pid_m, stride_xm, stride_we, stride_wn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    """out[row, n] = silu(x[tok] . w[slot, n]) * (x[tok] . w[slot, N + n]); N = I, K = H."""
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    pid_m, pid_n = _tile_of(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)                        # [BM]
    row_ok = pair < P
    tok = tl.where(row_ok, pair // top_k, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nw = offs_n % N        # wrap instead of masking weight loads; stores are masked
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]                   # [BM, BK]
    g_ptrs = (w_ptr + slot.to(tl.int64) * stride_we
              + offs_nw[None, :].to(tl.int64) * stride_wn + offs_k[:, None])    # [BK, BN]
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = offs_k < K - kk * BLOCK_K
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        acc_g = tl.dot(x, g, acc_g)
        acc_u = tl.dot(x, u, acc_u)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    h = acc_g * tl.sigmoid(acc_g) * acc_u                          # silu(g) * u in fp32
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[None, :])


@triton.jit(do_not_specialize=["P", "num_pid_m"])
def _moe_down_kernel(a_ptr, w_ptr, out_ptr, sorted_ids_ptr, block_slot_ptr, topk_w_ptr,
                     P, N, K, num_pid_m, stride_am, stride_we, stride_wn, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    """out[pair, n] = topk_w[pair] * a[row] . w[slot, n]; N = H, K = I."""
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    pid_m, pid_n = _tile_of(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)                        # [BM]
    row_ok = pair < P
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nw = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]   # [BM, BK]
    w_ptrs = (w_ptr + slot.to(tl.int64) * stride_we
              + offs_nw[None, :].to(tl.int64) * stride_wn + offs_k[:, None])    # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    route_w = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)   # [BM] fp32
    acc = acc * route_w[:, None]
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_n < N)[None, :])


@triton.jit(do_not_specialize=["top_k"])
def _moe_sum_kernel(pair_out_ptr, slots_ptr, out_ptr, H, S, top_k, stride_om,
                    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr = False):
    """out[t] = sum_k pair_out[t*K + k] over k with 0 <= slot < S (others were never written)."""
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    slot = tl.load(slots_ptr + t * top_k + offs_k, mask=offs_k < top_k, other=-1)
    ok = (slot >= 0) & (slot < S)
    rows = t * top_k + offs_k                                       # [BLOCK_K]
    vals = tl.load(pair_out_ptr + rows[:, None] * H + offs_h[None, :],
                   mask=ok[:, None] & (offs_h < H)[None, :], other=0.0)
    total = tl.sum(vals.to(tl.float32), axis=0)                    # [BLOCK_H]
    tl.store(out_ptr + t * stride_om + offs_h, total.to(out_ptr.dtype.element_ty),
             mask=offs_h < H)


def _launch_opts(g: dict) -> dict:
    return {"BLOCK_N": g["BLOCK_N"], "BLOCK_K": g["BLOCK_K"], "GROUP_M": g["GROUP_M"],
            "num_warps": g["num_warps"], "num_stages": g["num_stages"]}


def moe_up(hidden: torch.Tensor, w13: torch.Tensor, sorted_ids: torch.Tensor,
           block_slot: torch.Tensor, top_k: int, block_m: int, g: dict) -> torch.Tensor:
    """-> inter [num_blocks*BLOCK_M, I] in hidden's dtype."""
    S, two_i, H = w13.shape
    inter_size = two_i // 2
    nb = block_slot.numel()
    P = hidden.shape[0] * top_k
    inter = _alloc(nb * block_m, inter_size, dtype=hidden.dtype, device=hidden.device)
    grid = (nb * cdiv(inter_size, g["BLOCK_N"]),)
    _moe_up_kernel[grid](hidden, w13, inter, sorted_ids, block_slot, P, top_k, inter_size, H,
                         nb, hidden.stride(0), w13.stride(0), w13.stride(1), inter.stride(0),
                         BLOCK_M=block_m, EVEN_K=H % g["BLOCK_K"] == 0, **_launch_opts(g), **pdl(hidden))
    return inter


def moe_down(inter: torch.Tensor, w2: torch.Tensor, sorted_ids: torch.Tensor,
             block_slot: torch.Tensor, topk_weights: torch.Tensor, block_m: int,
             g: dict) -> torch.Tensor:
    """-> pair_out [P, H]; rows of pairs with a skipped slot are left unwritten."""
    S, H, inter_size = w2.shape
    nb = block_slot.numel()
    P = topk_weights.numel()
    pair_out = _alloc(P, H, dtype=inter.dtype, device=inter.device)
    grid = (nb * cdiv(H, g["BLOCK_N"]),)
    _moe_down_kernel[grid](inter, w2, pair_out, sorted_ids, block_slot, topk_weights, P, H,
                           inter_size, nb, inter.stride(0), w2.stride(0), w2.stride(1),
                           pair_out.stride(0), BLOCK_M=block_m,
                           EVEN_K=inter_size % g["BLOCK_K"] == 0, **_launch_opts(g), **pdl(inter))
    return pair_out


def moe_sum(pair_out: torch.Tensor, topk_slots: torch.Tensor, num_slots: int,
            out: torch.Tensor) -> torch.Tensor:
    T, K = topk_slots.shape
    H = pair_out.shape[1]
    block_h = min(1024, next_pow2(H))
    _moe_sum_kernel[(T, cdiv(H, block_h))](pair_out, topk_slots, out, H, num_slots, K,
                                           out.stride(0), BLOCK_K=next_pow2(K),
                                           BLOCK_H=block_h, num_warps=4, **pdl(out))
    return out


def fused_moe_pairs_triton(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                           topk_weights: torch.Tensor, topk_slots: torch.Tensor,
                           config: MoEConfig, aligned: Optional[Alignment] = None) -> torch.Tensor:
    """Steps 1-3: -> pair_out [T*K, H], the weighted contribution of each (token, k) pair; rows of
    pairs whose slot is skipped are left unwritten. T > 0; topk_slots int32, topk_weights f32.
    `aligned`: step 1 done already (by the kernel that wrote topk_slots), with config's BLOCK_M."""
    K = topk_slots.shape[1]
    bm = config["BLOCK_M"]
    if aligned is not None:
        assert aligned.block_m == bm and aligned.num_pairs == topk_slots.numel()
        sorted_ids, block_slot = aligned.sorted_ids, aligned.block_slot
    else:
        sorted_ids, block_slot = moe_align(topk_slots, w13.shape[0], bm)
    inter = moe_up(hidden, w13, sorted_ids, block_slot, K, bm, config["up"])
    return moe_down(inter, w2, sorted_ids, block_slot, topk_weights, bm, config["down"])


def fused_moe_triton(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     topk_weights: torch.Tensor, topk_slots: torch.Tensor, config: MoEConfig,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    T = topk_slots.shape[0]
    if out is None:
        out = torch.empty_like(hidden)
    if T == 0:
        return out
    topk_slots = topk_slots.to(torch.int32).contiguous()
    pair_out = fused_moe_pairs_triton(hidden, w13, w2, topk_weights.to(torch.float32).contiguous(), topk_slots,
                                      config)
    return moe_sum(pair_out, topk_slots, w13.shape[0], out)
