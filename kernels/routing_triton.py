"""Triton kernels for top-k routing and logical->physical slot mapping (imported lazily: needs triton)."""
import triton
import triton.language as tl

from .pdl_triton import pdl_enter


@triton.jit
def softmax_topk(logits_ptr, offs_t, t_ok, E, stride_t, TOP_K: tl.constexpr, RENORM: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    # -> (weights [BLOCK_T, BLOCK_K] f32, ids [BLOCK_T, BLOCK_K] int32), descending weights.
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    x = tl.load(logits_ptr + offs_t[:, None].to(tl.int64) * stride_t + offs_e[None, :],
                mask=t_ok[:, None] & (offs_e < E)[None, :], other=float("-inf"))
    x = tl.where(t_ok[:, None], x.to(tl.float32), 0.0)            # [BLOCK_T, BLOCK_E]
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where((offs_e < E)[None, :], p, -1.0)                   # padding never wins
    w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best, arg = tl.max(p, axis=1, return_indices=True)         # [BLOCK_T]: one reduction, the first max
        arg = arg.to(tl.int32)
        w = tl.where(offs_k[None, :] == k, best[:, None], w)
        ids = tl.where(offs_k[None, :] == k, arg[:, None], ids)
        p = tl.where(offs_e[None, :] == arg[:, None], -1.0, p)     # remove the winner
    if RENORM:
        w = w / tl.sum(w, axis=1)[:, None]
    return w, ids


@triton.jit
def _topk_route_kernel(logits_ptr, w_ptr, ids_ptr, T, E, stride_t,
                       TOP_K: tl.constexpr, RENORM: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                       USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    # One fused pass replaces softmax + topk + sum + div + cast (5 launches at decode).
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    t_ok = offs_t < T
    w, ids = softmax_topk(logits_ptr, offs_t, t_ok, E, stride_t, TOP_K, RENORM, BLOCK_T, BLOCK_E, BLOCK_K)
    out_off = offs_t[:, None] * TOP_K + offs_k[None, :]
    out_mask = t_ok[:, None] & (offs_k < TOP_K)[None, :]
    tl.store(w_ptr + out_off, w, mask=out_mask)
    tl.store(ids_ptr + out_off, ids, mask=out_mask)


@triton.jit
def _route_to_slots_kernel(logits_ptr, w_ptr, phys_ptr, local_ptr, l2p_ptr, count_ptr, load_ptr, valid_ptr,
                           T, E, stride_t, stride_l2p, first_slot, slots_per_rank,
                           TOP_K: tl.constexpr, RENORM: tl.constexpr, RECORD: tl.constexpr,
                           HAS_VALID: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                           USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    # Routing plus the replica choice, the slot gather, the load count and the local-slot mask:
    # ~20 small torch launches at decode become this one.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    t_ok = offs_t < T
    w, ids = softmax_topk(logits_ptr, offs_t, t_ok, E, stride_t, TOP_K, RENORM, BLOCK_T, BLOCK_E, BLOCK_K)
    out_mask = t_ok[:, None] & (offs_k < TOP_K)[None, :]
    out_off = offs_t[:, None] * TOP_K + offs_k[None, :]
    tl.store(w_ptr + out_off, w, mask=out_mask)
    _store_slots(ids, offs_t, out_mask, out_off, phys_ptr, local_ptr, l2p_ptr, count_ptr, load_ptr, valid_ptr,
                 stride_l2p, first_slot, slots_per_rank, RECORD, HAS_VALID, BLOCK_T, BLOCK_K)


@triton.jit
def physical_slots(ids, offs_t, mask, l2p_ptr, count_ptr, valid_ptr, stride_l2p, HAS_VALID: tl.constexpr):
    # Logical ids [BLOCK_T, BLOCK_K] of tokens offs_t -> global physical slots, int64 (-1 outside `mask`).
    ids = ids.to(tl.int64)
    # Replicas of one expert take tokens in turn: replica = token index % replica count.
    count = tl.load(count_ptr + ids, mask=mask, other=1)
    replica = offs_t[:, None].to(tl.int64) % count
    phys = tl.load(l2p_ptr + ids * stride_l2p + replica, mask=mask, other=-1).to(tl.int64)
    if HAS_VALID:  # a device scalar, so a captured graph reads each replay's real batch size
        # CUDA-graph padding rows go to no slot: no expert reads weights for them, no rank receives them.
        phys = tl.where((offs_t < tl.load(valid_ptr))[:, None], phys, -1)
    return phys


@triton.jit
def _store_slots(ids, offs_t, out_mask, out_off, phys_ptr, local_ptr, l2p_ptr, count_ptr, load_ptr, valid_ptr,
                 stride_l2p, first_slot, slots_per_rank, RECORD: tl.constexpr, HAS_VALID: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # The replica choice, the slot gather, the load count and the local-slot mask of logical ids [BLOCK_T, BLOCK_K].
    phys = physical_slots(ids, offs_t, out_mask, l2p_ptr, count_ptr, valid_ptr, stride_l2p, HAS_VALID)
    local = phys - first_slot
    local = tl.where((phys >= 0) & (local >= 0) & (local < slots_per_rank), local, -1)
    if RECORD:
        ones = tl.full((BLOCK_T, BLOCK_K), 1, dtype=tl.int64)
        tl.atomic_add(load_ptr + phys, ones, mask=out_mask & (phys >= 0), sem="relaxed")  # a count: no ordering
    tl.store(phys_ptr + out_off, phys, mask=out_mask)
    tl.store(local_ptr + out_off, local.to(tl.int32), mask=out_mask)


@triton.jit
def _ids_to_slots_kernel(ids_ptr, phys_ptr, local_ptr, l2p_ptr, count_ptr, load_ptr, valid_ptr,
                         T, stride_ids, stride_l2p, first_slot, slots_per_rank,
                         TOP_K: tl.constexpr, RECORD: tl.constexpr, HAS_VALID: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    out_mask = (offs_t < T)[:, None] & (offs_k < TOP_K)[None, :]
    ids = tl.load(ids_ptr + offs_t[:, None].to(tl.int64) * stride_ids + offs_k[None, :], mask=out_mask, other=0)
    _store_slots(ids, offs_t, out_mask, offs_t[:, None] * TOP_K + offs_k[None, :], phys_ptr, local_ptr, l2p_ptr,
                 count_ptr, load_ptr, valid_ptr, stride_l2p, first_slot, slots_per_rank, RECORD, HAS_VALID,
                 BLOCK_T, BLOCK_K)


@triton.jit
def _grouped_topk_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, stride_t, scaling,
                         TOP_K: tl.constexpr, RENORM: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                         GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, TOP2: tl.constexpr,
                         BLOCK_T: tl.constexpr, E: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)  # first: see pdl_triton.py
    # DeepSeek routing (see routing.grouped_topk) in one pass; E and GROUPS are powers of two here.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E)
    offs_k = tl.arange(0, BLOCK_K)
    t_ok = offs_t < T
    x = tl.load(logits_ptr + offs_t[:, None].to(tl.int64) * stride_t + offs_e[None, :], mask=t_ok[:, None], other=0.0)
    x = x.to(tl.float32)                                           # [BLOCK_T, E]
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + offs_e).to(tl.float32)[None, :]
    if GROUPS > 1:
        per_group: tl.constexpr = E // GROUPS
        grouped = tl.reshape(choice, (BLOCK_T, GROUPS, per_group))
        rank = tl.max(grouped, axis=2)                             # [BLOCK_T, GROUPS]
        if TOP2:  # the sum of each group's two best
            offs_in = tl.arange(0, per_group)
            best = tl.argmax(grouped, axis=2)
            rest = tl.where(offs_in[None, None, :] == best[:, :, None], float("-inf"), grouped)
            rank = rank + tl.max(rest, axis=2)
        offs_g = tl.arange(0, GROUPS)
        keep = tl.zeros((BLOCK_T, GROUPS), dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUPS):
            g = tl.argmax(rank, axis=1)
            hit = offs_g[None, :] == g[:, None]
            keep = tl.where(hit, 1, keep)
            rank = tl.where(hit, float("-inf"), rank)
        eligible = tl.reshape(tl.broadcast_to(keep[:, :, None], (BLOCK_T, GROUPS, per_group)), (BLOCK_T, E))
        choice = tl.where(eligible != 0, choice, float("-inf"))
    w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        arg = tl.argmax(choice, axis=1).to(tl.int32)
        hit = offs_e[None, :] == arg[:, None]
        w = tl.where(offs_k[None, :] == k, tl.sum(tl.where(hit, scores, 0.0), axis=1)[:, None], w)
        ids = tl.where(offs_k[None, :] == k, arg[:, None], ids)
        choice = tl.where(hit, float("-inf"), choice)              # remove the winner
    if RENORM:
        w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
    w = w * scaling
    out_off = offs_t[:, None] * TOP_K + offs_k[None, :]
    out_mask = t_ok[:, None] & (offs_k < TOP_K)[None, :]
    tl.store(w_ptr + out_off, w, mask=out_mask)
    tl.store(ids_ptr + out_off, ids, mask=out_mask)
