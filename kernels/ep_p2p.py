"""Peer-to-peer expert-parallel exchange: launchers of the Triton kernels in ep_p2p_triton.py (and, for steps of
one row per rank, ep_ll_triton.py's low-latency protocol).

Each rank owns regions that every rank of the group can read and write (symmetric memory mapped over NVLink;
the callers pass each region as a table of W raw addresses, one per rank):

    tokens   [W * cap, H]    rows from every rank, rank s's at [s * rows, (s + 1) * rows)
    weights  [W * cap, K]    f32 routing weights of those rows (0 on padding rows)
    ids      [W * cap, K]    int32 slot index of each (row, k) among this rank's slots, -1 when the slot is on
                             another rank or the row is padding (what the fused-MoE backend takes as is)
    combine  [W * cap, H]    partial results for this rank's rows, rank s's at [s * rows, ...)
    ll_*     [W * LL_MAX_ROWS, ...]  the low-latency protocol's receive words (LowLatencyTables)
    pad      [W]             int64 barrier signals, one per rank
and, private to the rank (a Barrier): `sequence` (exchanges passed), `arrivals` (CTAs of the kernel under way
that are done), `abort`.

One MoE layer, `rows` = the step's largest per-rank token count (every rank knows it):
    dispatch   (route my rows: `router`, decode steps) write them into every rank's tokens/weights/ids at my
               block; barrier; (align every rank's ids here for my experts: `aligned`, decode steps)
    compute    my experts over all W * rows rows of my own buffers (contiguous) -> each (row, k) pair's
               contribution (or, for the torch reference, each row's sum: partial)
    push       sum each row's pairs (fp32) and write block d into rank d's combine at my block; barrier
    reduce     sum my W blocks in rank order (fp32): the next RMSNorm's kernel (layers/unreduced.py), or
               p2p_combine_reduce

Two barriers per layer are enough. A rank writes a peer's tokens only after the last layer's second barrier,
which the peer passed only after computing from them; it writes a peer's combine buffer only after this
layer's first barrier, which the peer reached only after summing the last layer's (its norm, before its
dispatch).

The barrier is the end of the dispatch and push kernels, run by the last of their CTAs:
1. Every CTA stores its rows, then bar.sync (the stores of all its threads now precede, at CTA scope, what
   its one signalling thread does next), then an acq_rel atomic add (GPU scope) on the rank's `arrivals`.
2. The CTA whose add returns (number of CTAs - 1) read the end of an RMW chain holding every other CTA's add:
   its acquire synchronizes with each of their releases, so every store of the grid, to this rank's memory or
   over NVLink to a peer's, happens before its next step.
3. It bumps `sequence` to n and release-stores n into every other rank's pad (system scope). Release is
   cumulative (causality order is transitive across the CTA-, GPU- and system-scope steps, each of them a
   release and an acquire of one scope that holds both threads): a peer whose acquire reads n sees all the
   grid's stores, not only the last CTA's.
4. It waits until its own pad shows n from every other rank (or `abort`), polling with volatile loads, then
   reads each pad once more with an acquire load (which synchronizes with that rank's release). The kernel
   then ends, and the next kernel on the stream (the experts, the reduce) sees all that these acquires saw.
Step 1 at system scope and an acquire atomic per polling round (its value passed between the CTA's threads
each round) cost ~6 us more per layer (2 x H100, `benchmarks/ep_comm.py`, docs/distributed.md).
Only that one CTA waits, and only after every other CTA of its grid has finished, so a rank's wait never
depends on a CTA the GPU has not scheduled (all CTAs waiting could deadlock across GPUs once a grid has more
CTAs than resident slots). The last CTA resets `arrivals` to 0: the grid's other CTAs are done with it, and
the next kernel using it runs after this one on the same stream. Counters advance and reset on the device,
so CUDA-graph replays need nothing from the host. A CUDA-graph warm-up (`sync` off) runs the same kernels on
the rank's own buffers: the last CTA only resets the counter. Every CTA reads `sequence` when it starts: only the CTA
running the barrier writes it, after all the others are done.

The low-latency protocol (rows <= LL_MAX_ROWS): each 8-byte word written into a peer holds 4 bytes of data and the
exchange's sequence number n (its low 32 bits), and the peer polls until every word it needs shows n; a word lands
whole, so no fence, no signal and no barrier are needed (ep_ll_triton.py). Buffers stay safe to reuse by the same
argument as the barriers': a rank sends a layer's dispatch words only after it received the peer's push of the
layer before, which the peer sent after unpacking that layer's dispatch words; and it sends push words only after
receiving the peer's dispatch words of the same layer, sent after the peer unpacked the last push. So every rank
receives every row from every peer, its padding rows too: a rank without tokens that skipped its peers' results
would run ahead into the next dispatch and rewrite words a slow peer has yet to read (seen on the CPU as a hang:
three ranks, one without tokens). Both protocols advance `sequence` alike, so steps may alternate between them.
The flag is n modulo 2**32 - 1, plus 1 (never the 0 the buffers start with): a stale word passes for a new one
only if a multiple of 2**32 - 1 exchanges (50 days at 1 000 a second) went by since it was written and the
receiver reads it before the new word lands.

All launches are fixed-shape kernels with no host sync, so a decode step captures them in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ._backend import cdiv, next_pow2, pdl, tl_dtype
from .routing import RouterInputs

if TYPE_CHECKING:
    from .moe_triton import Alignment

_BLOCK_H = 1024
_MAX_PROGRAMS = 512  # per destination rank: a program per row for every decode batch (graphs go up to 512)
_MAX_ROUTED_EXPERTS = 4096  # as routing.route_to_slots: more logits than one program routes
_ONE_WARP_PAIRS = 256  # a dispatch that aligns more (token, k) pairs than this runs 4 warps
# Steps of at most this many rows per rank take the low-latency protocol (ep_ll_triton.py): at 1 row per rank
# (2 x H100, decode.py) a lone request's step went 4.20 -> 3.86 ms and one per rank 4.69 -> 4.43, but 2 rows
# per rank went 5.98 -> 6.11 (one program then does twice the serial work and the words double the bytes).
LL_MAX_ROWS = 1


@dataclass(frozen=True)
class Barrier:
    """One rank's device-side barrier. pad_table [W] int64: every rank's pad ([W] int64) as an address;
    sequence [1] int64: exchanges passed; arrivals [1] int32: CTAs of the kernel under way that are done (0
    between kernels); abort [1] int32: raised by the host to release every wait."""

    pad_table: torch.Tensor
    sequence: torch.Tensor
    arrivals: torch.Tensor
    abort: torch.Tensor


def _grid(rows: int, world: int) -> tuple[int, int]:
    """(programs, destination columns): a program per row up to _MAX_PROGRAMS (every decode batch), then each
    program loops over rows (every program ends in an arrival atomic, so a prefill chunk of thousands of rows
    must not mean thousands of programs); a column per destination rank."""
    return max(1, min(rows, _MAX_PROGRAMS)), world


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def p2p_dispatch(hidden: torch.Tensor, physical: torch.Tensor | None, weights: torch.Tensor | None,
                 tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor], barrier: Barrier, rows: int, rank: int,
                 slots_per_rank: int, sync: bool = True, router: RouterInputs | None = None,
                 aligned: tuple[torch.Tensor, Alignment] | None = None) -> None:
    """hidden [T, H], physical [T, K] global slot ids (any int dtype), weights [T, K] (cast to f32 in the
    kernel) -> every rank's tokens/weights/ids (tables: their addresses [W] each), then the barrier if `sync`.
    T <= rows; rank d's slots are [d * slots_per_rank, (d + 1) * slots_per_rank). With `router` instead of
    physical and weights, the rows are routed (route_to_slots, load counted) in this kernel when every row has its
    own program (decode steps), by the route kernel first otherwise. `aligned` (this rank's ids buffer [W * rows,
    K] and its empty Alignment): the kernel then also aligns every rank's ids there for the experts (one
    launch fewer)."""
    from .ep_p2p_triton import p2p_dispatch_kernel

    if router is not None and (rows > _MAX_PROGRAMS or router.logits.shape[1] > _MAX_ROUTED_EXPERTS):
        # programs looping over rows (a prefill chunk), or too many experts for one program: route all at once
        weights, physical, _ = router.route()
        router = None
    assert (router is None) == (physical is not None and weights is not None), "pass a router or the routing"
    tokens_table, weights_table, ids_table = tables
    world = tokens_table.shape[0]
    hidden = _row_major(hidden)
    physical, weights, top_k, route_args, route_meta = _routing(physical, weights, router)
    align_args, align_meta = _align_args(aligned, physical)
    # One warp where a row's top-k rounds then reduce within it (as the route kernel's) and the alignment is small.
    small = router is not None and (aligned is None or aligned[1].num_pairs <= _ONE_WARP_PAIRS)
    p2p_dispatch_kernel[_grid(rows, world)](
        hidden, physical, weights, tokens_table, weights_table, ids_table, barrier.pad_table, barrier.sequence,
        barrier.arrivals, barrier.abort, hidden.shape[0], rows, rank, world, slots_per_rank, int(sync),
        hidden.stride(0), physical.stride(0), weights.stride(0), *route_args, *align_args, H=hidden.shape[1],
        K=top_k, BLOCK_H=min(_BLOCK_H, next_pow2(hidden.shape[1])), BLOCK_K=next_pow2(top_k), **route_meta,
        **align_meta, num_warps=1 if small else 4, **pdl(hidden))


def _align_args(aligned: tuple[torch.Tensor, Alignment] | None, dummy: torch.Tensor) -> tuple[tuple, dict]:
    """The dispatch kernel's alignment arguments (ids_here, cursor, sorted_ids, block_slot, P, S, num_blocks)
    and constexprs."""
    if aligned is None:
        return (dummy,) * 4 + (0, 0, 0), dict(ALIGN=False, BLOCK_M=1, BLOCK=1, BLOCK_S=1, BLOCK_B=1)
    ids_here, alignment = aligned
    assert ids_here.dtype == torch.int32 and ids_here.is_contiguous() and ids_here.numel() == alignment.num_pairs
    assert alignment.in_one_program
    return (ids_here,) + alignment.args(), dict(ALIGN=True, **alignment.meta())


def _routing(physical: torch.Tensor | None, weights: torch.Tensor | None,
             router: RouterInputs | None) -> tuple[torch.Tensor, torch.Tensor, int, tuple, dict]:
    """The dispatch kernels' routing inputs: (physical, weights, top_k, routing arguments, routing constexprs),
    from the route kernel's output or, with `router`, for routing in the kernel (physical and weights unused)."""
    if router is None:
        physical, weights = _row_major(physical), _row_major(weights)  # type: ignore[arg-type]
        return physical, weights, physical.shape[1], _unrouted_args(physical), _UNROUTED_META
    return router.logits, router.logits, router.top_k, _route_args(router), _route_meta(router)


def _route_args(router: RouterInputs) -> tuple:
    """The dispatch kernel's routing arguments (logits, stride, l2p, counts, load, valid, l2p stride, E)."""
    logits, l2p = _row_major(router.logits), _row_major(router.logical_to_physical)
    counts = router.replica_count.contiguous()
    assert l2p.dtype == counts.dtype == torch.int64 and l2p.shape[0] == logits.shape[1]
    load = router.expert_load
    assert load is None or (load.dtype == torch.int64 and load.is_contiguous())
    return (logits, logits.stride(0), l2p, counts, load if load is not None else counts,  # dummies: never touched
            router.num_valid if router.num_valid is not None else counts, l2p.stride(0), logits.shape[1])


def _route_meta(router: RouterInputs) -> dict:
    return dict(BLOCK_E=next_pow2(router.logits.shape[1]), ROUTE=True, RENORM=router.renormalize,
                RECORD=router.expert_load is not None, HAS_VALID=router.num_valid is not None)


def _unrouted_args(physical: torch.Tensor) -> tuple:
    return (physical, 0, physical, physical, physical, physical, 0, 1)  # never read without ROUTE


_UNROUTED_META = dict(BLOCK_E=1, ROUTE=False, RENORM=False, RECORD=False, HAS_VALID=False)


def p2p_combine_push(partial: torch.Tensor, combine_table: torch.Tensor, out_dtype: torch.dtype, barrier: Barrier,
                     rows: int, rank: int, sync: bool = True, pair_ids: torch.Tensor | None = None) -> None:
    """partial [W * rows, H] (any float dtype): block d -> rank d's combine buffer (out_dtype) at this rank's
    block, then the barrier if `sync`. With pair_ids [W * rows, K] int32, partial is [W * rows * K, H]: each
    row's K pair contributions, summed (fp32, those with pair_ids >= 0 only) as they are sent."""
    from .ep_p2p_triton import p2p_combine_push_kernel

    world = combine_table.shape[0]
    pairs = 1 if pair_ids is None else pair_ids.shape[1]
    if pair_ids is not None:
        assert pair_ids.dtype == torch.int32 and partial.shape[0] == pair_ids.numel()
    hidden_size = partial.shape[1]
    p2p_combine_push_kernel[_grid(rows, world)](
        partial.contiguous(), pair_ids.contiguous() if pair_ids is not None else combine_table, combine_table,
        barrier.pad_table, barrier.sequence, barrier.arrivals, barrier.abort, rows, rank, world, int(sync),
        H=hidden_size, PAIRS=pairs, OUT=tl_dtype(out_dtype), BLOCK_H=min(_BLOCK_H, next_pow2(hidden_size)),
        BLOCK_P=next_pow2(pairs), num_warps=4, **pdl(partial))


def p2p_combine_reduce(combine: torch.Tensor, num_tokens: int, rows: int, world: int) -> torch.Tensor:
    """This rank's combine buffer [W * cap, H] -> out [num_tokens, H]: the W blocks summed in rank order."""
    from .ep_p2p_triton import p2p_combine_reduce_kernel

    hidden_size = combine.shape[1]
    out = torch.empty(num_tokens, hidden_size, dtype=combine.dtype, device=combine.device)
    if num_tokens:
        block = min(_BLOCK_H, next_pow2(hidden_size))
        p2p_combine_reduce_kernel[(num_tokens, cdiv(hidden_size, block))](
            combine, out, rows, world, out.stride(0), H=hidden_size, BLOCK_H=block, num_warps=4, **pdl(out))
    return out


# ---- the low-latency protocol (ep_ll_triton.py): steps of at most LL_MAX_ROWS rows per rank -------------------

@dataclass(frozen=True)
class LowLatencyTables:
    """Every rank's receive regions of the low-latency protocol as address tables [W] int64, each region int64
    words (4 bytes of data + the sequence number): tokens and combine [W * LL_MAX_ROWS, H * itemsize / 4],
    ids and weights [W * LL_MAX_ROWS, K]."""

    tokens: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    combine: torch.Tensor


def _words(hidden_size: int, dtype: torch.dtype) -> int:
    assert hidden_size * dtype.itemsize % 4 == 0, "rows must be whole 4-byte words"
    return hidden_size * dtype.itemsize // 4


def p2p_ll_dispatch(hidden: torch.Tensor, physical: torch.Tensor | None, weights: torch.Tensor | None,
                    plain: tuple[torch.Tensor, torch.Tensor, torch.Tensor], tables: LowLatencyTables,
                    barrier: Barrier, rows: int, rank: int, slots_per_rank: int, sync: bool = True,
                    router: RouterInputs | None = None, aligned: Alignment | None = None) -> None:
    """p2p_dispatch for rows <= LL_MAX_ROWS in one program and no barrier: every rank's rows end up in this
    rank's plain buffers (tokens [W * cap, H], ids [.., K] int32, weights [.., K] f32); routed here with
    `router`; `aligned`: then also aligned for the experts."""
    from .ep_ll_triton import p2p_ll_dispatch_kernel

    assert rows <= LL_MAX_ROWS and (router is None) == (physical is not None and weights is not None)
    tokens, ids, weights_out = plain
    hidden = _row_major(hidden)
    physical, weights, top_k, route_args, route_meta = _routing(physical, weights, router)
    align_args, align_meta = _align_args((ids[:tables.tokens.shape[0] * rows], aligned) if aligned else None,
                                         physical)
    words = _words(hidden.shape[1], hidden.dtype)
    # Routing here, one warp: its top-k rounds reduce within the warp (2 x H100, gpu_lone_serve.sh: a lone
    # request's step 3.83 ms with 4 warps, 3.81 with 1; one per rank 4.43 / 4.40).
    p2p_ll_dispatch_kernel[(1,)](
        hidden, physical, weights, tokens, ids, weights_out, tables.tokens, tables.ids, tables.weights,
        barrier.sequence, barrier.abort, hidden.shape[0], rows, rank, tables.tokens.shape[0], slots_per_rank,
        int(sync), hidden.stride(0), hidden.stride(0) * hidden.dtype.itemsize // 4, physical.stride(0),
        weights.stride(0), *route_args, *align_args[1:], H=hidden.shape[1], H32=words, K=top_k,
        BLOCK_H=min(_BLOCK_H, next_pow2(hidden.shape[1])), BLOCK_W=min(_BLOCK_H, next_pow2(words)),
        BLOCK_K=next_pow2(top_k), **route_meta, **align_meta,
        num_warps=1 if router is not None else 4, **pdl(hidden))


def p2p_ll_push(partial: torch.Tensor, combine: torch.Tensor, tables: LowLatencyTables, barrier: Barrier, rows: int,
                rank: int, sync: bool = True, pair_ids: torch.Tensor | None = None) -> None:
    """p2p_combine_push for rows <= LL_MAX_ROWS in one program and no barrier: this rank's combine buffer
    [W * cap, H] then holds every rank's results for its rows (block s at rows [s * rows, ...))."""
    from .ep_ll_triton import p2p_ll_push_kernel

    assert rows <= LL_MAX_ROWS
    pairs = 1 if pair_ids is None else pair_ids.shape[1]
    if pair_ids is not None:
        assert pair_ids.dtype == torch.int32 and partial.shape[0] == pair_ids.numel()
    hidden_size = partial.shape[1]
    p2p_ll_push_kernel[(1,)](
        partial.contiguous(), pair_ids.contiguous() if pair_ids is not None else combine, combine, tables.combine,
        barrier.sequence, barrier.abort, rows, rank, tables.combine.shape[0], int(sync), H=hidden_size,
        H32=_words(hidden_size, combine.dtype), PAIRS=pairs, OUT=tl_dtype(combine.dtype),
        BLOCK_H=min(_BLOCK_H, next_pow2(hidden_size)), BLOCK_P=next_pow2(pairs), num_warps=4, **pdl(partial))
