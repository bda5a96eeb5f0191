"""Tests of the small fused kernels that replace decode's elementwise torch code (CPU, < 30 s):
RMSNorm (plain, per head, fused with the residual add), neox rotary (optionally after the
per-head q/k norm) and routing to physical expert slots.

1. The torch references (the CPU engine path, which must stay bit-for-bit what the layers did
   before) against naive float64 computations.
2. When triton is importable: the Triton kernels under the interpreter (TRITON_INTERPRET=1)
   against the references, with outputs poisoned (NaN / huge ints) so that an unwritten element
   shows. The interpreter converts fp32 -> bf16 without round-to-nearest, so fp16 is checked
   exactly and bf16 within one bf16 ulp (bf16 is checked on the GPU by
   benchmarks/gpu_check_fused.py).
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch
from kernel_testing import gen as _gen  # noqa: E402
from kernel_testing import load_kernels, needs_triton
from kernel_testing import poisoned as _poisoned

INTERPRET_ENV = os.environ.get("ELASTIC_TRITON_ON_CPU", "0") == "1"
ek = load_kernels()
norm = importlib.import_module(ek.__name__ + ".norm")
rotary = importlib.import_module(ek.__name__ + ".rotary")
routing = importlib.import_module(ek.__name__ + ".routing")


@pytest.fixture
def interp(monkeypatch):
    """Triton interpreter on (before the Triton modules are first imported), poisoned outputs."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ELASTIC_TRITON_ON_CPU", "1")
    for mod in (norm, rotary, routing):
        monkeypatch.setattr(mod, "_alloc", _poisoned)


def _assert_close_dtype(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Exact for fp16/fp32. bf16 only to a relative (norm) error of 1e-2: the interpreter truncates
    where the GPU and torch round to nearest, at up to three roundings per output."""
    assert got.dtype == ref.dtype and got.shape == ref.shape and not torch.isnan(got).any()
    if got.dtype == torch.bfloat16:
        rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < 1e-2, rel
    else:
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _tables(P: int, D: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(P, dtype=torch.float32), inv_freq)  # [P, D/2]
    return freqs.cos(), freqs.sin()


def _qkv_views(T, Hq, Hkv, D, dtype, key):
    """q [T, Hq, D], k [T, Hkv, D] as strided views of one fused qkv output, as in the model."""
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=_gen("qkv", T, Hq, Hkv, D, key)).to(dtype)
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    return q, k


# ---------------------------------------------------------------------------------------------
# References vs naive float64


def _naive_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("shape", [(7, 48), (5, 3, 16)])
def test_rms_norm_reference_vs_naive(shape):
    g = _gen("rms", shape)
    x, w = torch.randn(*shape, generator=g) * 3, torch.rand(shape[-1], generator=g) + 0.5
    ref = norm.rms_norm_reference(x, w, 1e-6)
    torch.testing.assert_close(ref.double(), _naive_rms(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    r = torch.randn(*shape, generator=g)
    if len(shape) == 2:
        normed, res = norm.fused_add_rms_norm_reference(x, r, w, 1e-6)
        assert torch.equal(res, r + x) and torch.equal(normed, norm.rms_norm_reference(r + x, w, 1e-6))
    if not INTERPRET_ENV:   # CPU tensors without the interpreter: the public functions ARE the references
        assert torch.equal(norm.rms_norm(x, w, 1e-6), ref)
        if len(shape) == 2:
            got = norm.fused_add_rms_norm(x, r, w, 1e-6)
            assert all(torch.equal(a, b) for a, b in zip(got, norm.fused_add_rms_norm_reference(x, r, w, 1e-6)))


def _naive_rotary(positions, x, cos, sin) -> torch.Tensor:
    T, H, D = x.shape
    out = torch.empty(T, H, D, dtype=torch.float64)
    for t in range(T):
        c, s = cos[positions[t]].double(), sin[positions[t]].double()
        for h in range(H):
            x1, x2 = x[t, h, :D // 2].double(), x[t, h, D // 2:].double()
            out[t, h, :D // 2] = x1 * c - x2 * s
            out[t, h, D // 2:] = x2 * c + x1 * s
    return out


def test_rotary_reference_vs_naive():
    T, Hq, Hkv, D = 6, 4, 2, 16
    cos, sin = _tables(64, D)
    q, k = _qkv_views(T, Hq, Hkv, D, torch.float32, "ref")
    positions = torch.tensor([0, 5, 63, 17, 17, 2])
    rq, rk = rotary.apply_rotary_reference(positions, q, k, cos, sin)
    torch.testing.assert_close(rq.double(), _naive_rotary(positions, q, cos, sin), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rk.double(), _naive_rotary(positions, k, cos, sin), rtol=1e-6, atol=1e-6)
    g = _gen("qkw")
    qw, kw = torch.rand(D, generator=g), torch.rand(D, generator=g)
    nq, nk = rotary.qk_norm_rotary_reference(positions, q, k, qw, kw, 1e-6, cos, sin)
    want_q = _naive_rotary(positions, _naive_rms(q, qw, 1e-6), cos, sin)
    torch.testing.assert_close(nq.double(), want_q, rtol=1e-5, atol=1e-6)
    assert torch.equal(nk, rotary.apply_rotary_reference(
        positions, q, norm.rms_norm_reference(k, kw, 1e-6), cos, sin)[1])
    if not INTERPRET_ENV:
        assert all(torch.equal(a, b) for a, b in zip(rotary.apply_rotary(positions, q, k, cos, sin), (rq, rk)))
        got = rotary.qk_norm_rotary(positions, q, k, qw, kw, 1e-6, cos, sin)
        assert torch.equal(got[0], nq) and torch.equal(got[1], nk)


def _distinct_logits(T: int, E: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Router logits without ties even in bf16, so that top-k ids are unambiguous."""
    rows = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float()
    return ((rows - E / 2) * 0.05).to(dtype)


def _placement(E: int, num_physical: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A shuffled placement with replicas -> (logical_to_physical [E, R] (-1 padded), counts [E])."""
    p2l = torch.cat([torch.arange(E), torch.randint(0, E, (num_physical - E,), generator=g)])
    p2l = p2l[torch.randperm(num_physical, generator=g)]
    counts = torch.bincount(p2l, minlength=E)
    l2p = torch.full((E, int(counts.max())), -1, dtype=torch.long)
    filled = [0] * E
    for slot, e in enumerate(p2l.tolist()):
        l2p[e, filled[e]] = slot
        filled[e] += 1
    return l2p, counts


def _naive_route(logits, K, renorm, l2p, counts, first, spr):
    T = logits.shape[0]
    num_physical = int(l2p.max()) + 1
    weights = torch.empty(T, K, dtype=torch.float64)
    physical = torch.empty(T, K, dtype=torch.long)
    load = torch.zeros(num_physical, dtype=torch.long)
    for t in range(T):
        p = torch.softmax(logits[t].double(), dim=0)
        ids = torch.argsort(p, descending=True)[:K]
        weights[t] = p[ids] / (p[ids].sum() if renorm else 1.0)
        for j, e in enumerate(ids.tolist()):
            physical[t, j] = l2p[e, t % int(counts[e])]
            load[physical[t, j]] += 1
    local = torch.where((physical >= first) & (physical < first + spr), physical - first, -1)
    return weights, physical, local.to(torch.int32), load


@pytest.mark.parametrize("renorm", [True, False])
def test_route_to_slots_reference_vs_naive(renorm):
    g = _gen("route_ref", renorm)
    T, E, K, num_physical, ranks = 19, 12, 3, 16, 2
    logits = _distinct_logits(T, E, g, torch.float32)
    l2p, counts = _placement(E, num_physical, g)
    spr = num_physical // ranks
    for rank in range(ranks):
        load = torch.zeros(num_physical, dtype=torch.long)
        w, phys, local = routing.route_to_slots_reference(logits, K, renorm, l2p, counts, load, rank * spr, spr)
        want_w, want_phys, want_local, want_load = _naive_route(logits, K, renorm, l2p, counts, rank * spr, spr)
        assert w.dtype == torch.float32 and phys.dtype == torch.int64 and local.dtype == torch.int32
        torch.testing.assert_close(w.double(), want_w, rtol=1e-6, atol=1e-6)
        assert torch.equal(phys, want_phys) and torch.equal(local, want_local) and torch.equal(load, want_load)
        assert torch.equal(routing.slots_to_local(phys, rank * spr, spr), local)
    w2, phys2, _ = routing.route_to_slots_reference(logits, K, renorm, l2p, counts, None, 0, num_physical)
    assert torch.equal(w2, w) and torch.equal(phys2, phys)       # no load: same routing, nothing counted
    # ep padding (-1 slots) maps to -1
    assert torch.equal(routing.slots_to_local(torch.tensor([[-1, 3, 8]]), 0, 8), torch.tensor([[-1, 3, -1]],
                                                                                               dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# Triton kernels under the interpreter


@needs_triton
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float32)])
@pytest.mark.parametrize("case", ["2d", "2d_strided_rows", "per_head_strided", "fused_add"])
def test_rms_norm_triton(interp, dtype, w_dtype, case):
    g = _gen("rms_tr", dtype, w_dtype, case)
    T, N, eps = 7, 40, 1e-5                                        # N not a power of 2: masked tail
    w = (torch.rand(N, generator=g) + 0.5).to(w_dtype)
    if case == "fused_add":
        x, r = torch.randn(T, N, generator=g).to(dtype), torch.randn(T, N, generator=g).to(dtype)
        got, got_res = norm.fused_add_rms_norm(x, r, w, eps)
        ref, ref_res = norm.fused_add_rms_norm_reference(x, r, w, eps)
        _assert_close_dtype(got_res, ref_res)
        # normalise the kernel's own residual so that a bf16 rounding difference does not compound
        ref = norm.rms_norm_reference(got_res, w, eps)
    else:
        base = torch.randn(T, 3 * N + 5, generator=g).to(dtype)   # rows of a wider (fused) output
        x = {"2d": base[:, :N].contiguous(), "2d_strided_rows": base[:, N + 5:2 * N + 5],
             "per_head_strided": base[:, 5:3 * N + 5].view(T, 3, N)[:, :2]}[case]
        got, ref = norm.rms_norm(x, w, eps), norm.rms_norm_reference(x, w, eps)
        assert got.is_contiguous()
    _assert_close_dtype(got, ref)


def test_sum_add_rms_norm_reference():
    """The blocks' sum is fp32 in block order rounded once, then exactly fused_add_rms_norm: what the exchange's
    reduce followed by the norm gave."""
    g = _gen("sum_ref")
    blocks = (torch.randn(3, 6, 24, generator=g) * 4).to(torch.bfloat16)   # 3 ranks' blocks, 6 rows each
    r, w = torch.randn(4, 24, generator=g).to(torch.bfloat16), torch.rand(24, generator=g) + 0.5
    acc = torch.zeros(4, 24)
    for block in blocks[:, :4]:
        acc += block.float()
    want = norm.fused_add_rms_norm_reference(acc.to(torch.bfloat16), r, w, 1e-6)
    got = norm.sum_add_rms_norm_reference(blocks, r, w, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    if not INTERPRET_ENV:
        assert all(torch.equal(a, b) for a, b in zip(norm.sum_add_rms_norm(blocks, r, w, 1e-6), want))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("parts,rows,T", [(2, 5, 3), (1, 4, 4), (3, 2, 2)])
def test_sum_add_rms_norm_triton(interp, dtype, parts, rows, T):
    """Blocks of an exchange buffer (rows beyond T are another rank's padding, poisoned) summed in the norm."""
    g = _gen("sum_tr", dtype, parts, rows, T)
    N = 40
    buffer = torch.full((parts * rows + 3, N), float("nan"), dtype=dtype)    # a larger buffer's first rows
    blocks = buffer[:parts * rows].view(parts, rows, N)
    blocks[:, :T] = torch.randn(parts, T, N, generator=g).to(dtype)
    r, w = torch.randn(T, N, generator=g).to(dtype), (torch.rand(N, generator=g) + 0.5).to(dtype)
    got, got_res = norm.sum_add_rms_norm(blocks, r, w, 1e-6)
    ref, ref_res = norm.sum_add_rms_norm_reference(blocks, r, w, 1e-6)
    _assert_close_dtype(got_res, ref_res)
    _assert_close_dtype(got, norm.rms_norm_reference(got_res, w, 1e-6))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,Hq,Hkv,D", [(1, 4, 2, 16), (9, 6, 1, 24), (4, 3, 3, 8)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_triton(interp, dtype, T, Hq, Hkv, D, qk_norm):
    P = 40
    cos, sin = _tables(P, D)
    q, k = _qkv_views(T, Hq, Hkv, D, dtype, "tr")
    positions = torch.randint(0, P, (T,), generator=_gen("pos", T))
    if qk_norm:
        g = _gen("w", D)
        qw, kw = (torch.rand(D, generator=g) + 0.5).to(dtype), (torch.rand(D, generator=g) + 0.5).to(dtype)
        got = rotary.qk_norm_rotary(positions, q, k, qw, kw, 1e-6, cos, sin)
        ref = rotary.qk_norm_rotary_reference(positions, q, k, qw, kw, 1e-6, cos, sin)
    else:
        got = rotary.apply_rotary(positions, q, k, cos, sin)
        ref = rotary.apply_rotary_reference(positions, q, k, cos, sin)
    for a, b in zip(got, ref):
        assert a.is_contiguous()
        _assert_close_dtype(a, b)


@needs_triton
@pytest.mark.parametrize("T,E,K,num_physical,ranks,renorm,dtype", [
    (1, 8, 2, 8, 1, True, torch.float32),
    (37, 60, 4, 64, 2, False, torch.bfloat16),          # several programs; E not a power of 2
    (20, 128, 8, 136, 1, True, torch.float16),          # Qwen3 routing with 8 redundant slots
    (5, 16, 3, 24, 3, True, torch.float32)])
@pytest.mark.parametrize("record", [True, False])
def test_route_to_slots_triton(interp, T, E, K, num_physical, ranks, renorm, dtype, record):
    g = _gen("route_tr", T, E, K, num_physical)
    logits = _distinct_logits(T, E, g, dtype)
    l2p, counts = _placement(E, num_physical, g)
    spr = num_physical // ranks
    first = (ranks - 1) * spr
    load = torch.randint(0, 5, (num_physical,), generator=g)   # accumulates onto existing counts
    ref_load = load.clone()
    w, phys, local = routing.route_to_slots(logits, K, renorm, l2p, counts, load if record else None, first, spr)
    rw, rphys, rlocal = routing.route_to_slots_reference(logits, K, renorm, l2p, counts,
                                                         ref_load if record else None, first, spr)
    assert torch.equal(phys, rphys) and torch.equal(local, rlocal) and local.dtype == torch.int32
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    assert torch.equal(load, ref_load)
    if record:  # CUDA-graph padding: rows at or past num_valid go to no slot and count no load
        valid = torch.tensor([T // 2])
        _, vphys, vlocal = routing.route_to_slots(logits, K, renorm, l2p, counts, load, first, spr, num_valid=valid)
        _, rvphys, rvlocal = routing.route_to_slots_reference(logits, K, renorm, l2p, counts, ref_load, first, spr,
                                                              num_valid=valid)
        assert torch.equal(load, ref_load) and torch.equal(vphys, rvphys) and torch.equal(vlocal, rvlocal)
        assert (vphys[T // 2:] == -1).all() and (vlocal[T // 2:] == -1).all()
        assert torch.equal(vphys[:T // 2], phys[:T // 2])
    # topk_route shares the softmax/top-k code with route_to_slots
    tw, tids = ek.topk_route(logits, K, renorm)
    assert torch.equal(tw, w) and torch.equal(tids, ek.topk_route_reference(logits, K, renorm)[1])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,Hq,Hkv,D", [(1, 4, 2, 16), (9, 6, 1, 24)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_into_cache_triton(interp, dtype, T, Hq, Hkv, D, qk_norm):
    """The fused kernel (rotary, then k and v written into the paged cache) equals the two steps: the same
    rotated q, and a cache holding the same values where the slots point (a padding row's slot -1 writes
    nothing)."""
    attention = importlib.import_module(ek.__name__ + ".attention")
    P, blocks, block_size = 40, 4, 8
    cos, sin = _tables(P, D)
    q, k = _qkv_views(T, Hq, Hkv, D, dtype, "cache")
    v = torch.randn(T, Hkv, D, generator=_gen("v", T)).to(dtype)
    positions = torch.randint(0, P, (T,), generator=_gen("pos", T))
    slots = torch.randperm(blocks * block_size, generator=_gen("slots", T))[:T]
    slots[T // 2] = -1
    g = _gen("w", D)
    qw, kw = ((torch.rand(D, generator=g) + 0.5).to(dtype), (torch.rand(D, generator=g) + 0.5).to(dtype)) \
        if qk_norm else (None, None)
    caches = [torch.full((blocks, block_size, Hkv, D), 7.0, dtype=dtype) for _ in range(4)]
    got_q = rotary.qk_rotary_store(positions, q, k, v, cos, sin, caches[0], caches[1], slots, qw, kw, 1e-6)
    if qk_norm:
        ref_q, ref_k = rotary.qk_norm_rotary(positions, q, k, qw, kw, 1e-6, cos, sin)
    else:
        ref_q, ref_k = rotary.apply_rotary(positions, q, k, cos, sin)
    attention.store_kvcache(ref_k, v, caches[2], caches[3], slots)
    assert torch.equal(got_q, ref_q)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    written = (caches[0] != 7.0).flatten(2).any(-1).sum()  # cache rows (block, offset) written
    assert int(written) == int((slots >= 0).sum())  # none for the padding row
