"""Triton kernel for top-k routing (imported lazily: needs triton)."""
import triton
import triton.language as tl


@triton.jit
def _topk_route_kernel(logits_ptr, w_ptr, ids_ptr, T, E, stride_t,
                       TOP_K: tl.constexpr, RENORM: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    # One fused pass replaces softmax + topk + sum + div + cast (5 launches at decode).
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    t_ok = offs_t < T
    x = tl.load(logits_ptr + offs_t[:, None].to(tl.int64) * stride_t + offs_e[None, :],
                mask=t_ok[:, None] & (offs_e < E)[None, :], other=float("-inf"))
    x = tl.where(t_ok[:, None], x.to(tl.float32), 0.0)            # [BLOCK_T, BLOCK_E]
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where((offs_e < E)[None, :], p, -1.0)                   # padding never wins
    w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)                                   # [BLOCK_T]
        arg = tl.argmax(p, axis=1).to(tl.int32)
        w = tl.where(offs_k[None, :] == k, best[:, None], w)
        ids = tl.where(offs_k[None, :] == k, arg[:, None], ids)
        p = tl.where(offs_e[None, :] == arg[:, None], -1.0, p)     # remove the winner
    if RENORM:
        w = w / tl.sum(w, axis=1)[:, None]
    out_off = offs_t[:, None] * TOP_K + offs_k[None, :]
    out_mask = t_ok[:, None] & (offs_k < TOP_K)[None, :]
    tl.store(w_ptr + out_off, w, mask=out_mask)
    tl.store(ids_ptr + out_off, ids, mask=out_mask)
