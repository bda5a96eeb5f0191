"""Kernel tests (CPU only, < 60 s on 2 cores).

1. The torch references (which define the semantics and run on the CPU engine path) against
   naive float64 computations.
2. When triton is importable: the Triton kernels on small shapes under the Triton interpreter
   (TRITON_INTERPRET=1) against the references, with outputs and internal buffers poisoned
   (NaN / huge ints) beforehand so that any element not written, or read before written, shows.
   tl.dot on bf16 operands is wrong in the Triton 3.9 CPU interpreter, so GEMM kernels are
   checked in fp16 here (bf16 is checked on the GPU by benchmarks/gpu_check_kernels.py).

kernels/ installs as `elastic.kernels`; these tests load the folder of this checkout under a
private module name so they do not depend on how (or whether) the package is installed, and
so that Triton's interpreter mode is in force when the Triton modules are first imported.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import HAS_TRITON, KERNELS_DIR
from kernel_testing import gen as _gen  # noqa: E402
from kernel_testing import load_kernels, needs_triton, poisoned

ek = load_kernels()


def _distinct_logits(T: int, E: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Router logits without ties even in bf16, so that top-k ids are unambiguous."""
    rows = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float()
    return ((rows - E / 2) * 0.05).to(dtype)                        # [T, E]


@pytest.fixture
def interp(monkeypatch):
    """Triton interpreter on, and poisoned allocations inside the Triton launchers."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ELASTIC_TRITON_ON_CPU", "1")
    from importlib import import_module
    moe_triton = import_module(ek.__name__ + ".moe_triton")
    attention = import_module(ek.__name__ + ".attention")

    monkeypatch.setattr(moe_triton, "_alloc", poisoned)
    monkeypatch.setattr(attention, "_alloc", poisoned)
    return moe_triton


def test_import_is_cheap_and_has_no_version():
    """Importing the package must not import triton (CPU engine path) nor define __version__."""
    import subprocess
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('k', {str(KERNELS_DIR / '__init__.py')!r},"
        f" submodule_search_locations=[{str(KERNELS_DIR)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['k'] = m; spec.loader.exec_module(m)\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
        "assert not hasattr(m, '__version__')\n"
        "print(m.HAS_TRITON)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(HAS_TRITON)


# ---------------------------------------------------------------------------------------------
# MoE


def _moe_inputs(T, K, S, H, I, dtype, skip_frac, key):
    g = _gen("moe", T, K, S, H, I, dtype, skip_frac, key)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(S, 2 * I, H, generator=g) / math.sqrt(H)).to(dtype)
    w2 = (torch.randn(S, H, I, generator=g) / math.sqrt(I)).to(dtype)
    slots = torch.randint(0, S, (T, K), generator=g, dtype=torch.int32)
    slots[torch.rand(T, K, generator=g) < skip_frac] = -1
    if T > 1:
        slots[T // 2] = -1                       # a token with no expert on this rank
    weights = torch.rand(T, K, generator=g)
    return x, w13, w2, weights, slots


def _naive_moe(x, w13, w2, weights, slots) -> torch.Tensor:
    T, K = slots.shape
    inter = w2.shape[2]
    out = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            s = int(slots[t, k])
            if s < 0:
                continue
            gu = w13[s].double() @ x[t].double()                      # [2I]
            h = F.silu(gu[:inter]) * gu[inter:]
            out[t] += float(weights[t, k]) * (w2[s].double() @ h)
    return out


@pytest.mark.parametrize("T,K,S,H,I,skip", [
    (1, 2, 4, 32, 16, 0.0), (9, 2, 4, 32, 16, 0.3), (33, 4, 16, 64, 48, 0.25),
    (64, 8, 32, 48, 24, 0.5), (5, 3, 3, 16, 8, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_reference_vs_naive(T, K, S, H, I, skip, dtype):
    x, w13, w2, weights, slots = _moe_inputs(T, K, S, H, I, dtype, skip, "ref")
    ref = ek.fused_moe_reference(x, w13, w2, weights, slots)
    assert ref.dtype == dtype and ref.shape == (T, H)
    want = _naive_moe(x, w13, w2, weights, slots)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ref.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
    assert torch.all(ref[(slots < 0).all(dim=1)] == 0)
    # fused_moe on CPU tensors without the interpreter is the reference itself
    if os.environ.get("ELASTIC_TRITON_ON_CPU", "0") != "1":
        assert torch.equal(ek.fused_moe(x, w13, w2, weights, slots), ref)


@pytest.mark.parametrize("renorm", [True, False])
def test_topk_route_reference_vs_naive(renorm):
    g = _gen("route", renorm)
    logits = _distinct_logits(17, 24, g, torch.bfloat16)
    w, ids = ek.topk_route_reference(logits, 5, renorm)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == (17, 5)
    p = torch.softmax(logits.double(), dim=-1)
    order = torch.sort(p, dim=-1, descending=True)
    want_w, want_ids = order.values[:, :5], order.indices[:, :5]
    if renorm:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(w.double(), want_w, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Attention


def _attn_case(seq_lens, q_lens, Hq, Hkv, D, block_size, dtype, key):
    """Random dense K/V per request written into a paged cache through shuffled tables."""
    g = _gen("attn", seq_lens, q_lens, Hq, Hkv, D, block_size, dtype, key)
    B = len(seq_lens)
    blocks = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks) + 3                                       # some unused blocks
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((B, max(blocks) + 1), -1, dtype=torch.int32)   # -1: must never be read
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    dense_k, dense_v, used = [], [], 0
    for b, (s, n) in enumerate(zip(seq_lens, blocks)):
        tables[b, :n] = perm[used:used + n]
        used += n
        pos = torch.arange(s)
        rows = tables[b, pos // block_size].long()
        dense_k.append(k_cache[rows, pos % block_size])                # [s, Hkv, D]
        dense_v.append(v_cache[rows, pos % block_size])
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), Hq, D, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, qsl, torch.tensor(seq_lens, dtype=torch.int32), dense_k, dense_v


def _naive_attention(q, dense_k, dense_v, qsl, seq_lens, scale) -> torch.Tensor:
    T, Hq, D = q.shape
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    for b, s in enumerate(seq_lens.tolist()):
        q0, q1 = int(qsl[b]), int(qsl[b + 1])
        group = Hq // dense_k[b].shape[1]
        for i in range(q1 - q0):
            pos = s - (q1 - q0) + i
            for h in range(Hq):
                k = dense_k[b][: pos + 1, h // group].double()             # [pos+1, D]
                v = dense_v[b][: pos + 1, h // group].double()
                p = torch.softmax(k @ q[q0 + i, h].double() * scale, dim=0)
                out[q0 + i, h] = p @ v
    return out


ATTN_CASES = {
    # name: (seq_lens, q_lens, Hq, Hkv, D, block_size)
    "prefill_gqa": ([7, 20], [7, 20], 4, 2, 16, 4),
    "chunked_prefill": ([19, 33], [5, 9], 4, 1, 16, 8),
    "decode_gqa": ([1, 9, 40, 17], [1, 1, 1, 1], 8, 2, 16, 4),
    "mixed_mha": ([12, 30, 5], [12, 1, 3], 2, 2, 32, 16),
    "odd_group_dim": ([10, 23], [4, 1], 6, 2, 24, 4),
    "long_context_chunk": ([75, 3], [21, 2], 4, 2, 16, 4),
}


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_paged_attention_reference_vs_dense(case):
    seq_lens, q_lens, Hq, Hkv, D, bs = ATTN_CASES[case]
    q, kc, vc, bt, qsl, sl, dk, dv = _attn_case(seq_lens, q_lens, Hq, Hkv, D, bs,
                                                torch.float32, "ref")
    scale = D ** -0.5
    ref = ek.paged_attention_reference(q, kc, vc, bt, qsl, sl, scale, max(q_lens), max(seq_lens))
    want = _naive_attention(q, dk, dv, qsl, sl, scale)
    torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-5)


def test_store_kvcache_reference():
    g = _gen("store_ref")
    T, Hkv, D, nb, bs = 6, 2, 8, 5, 4
    key, value = torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g)
    slots = torch.tensor([3, -1, 17, 0, -1, 9], dtype=torch.int64)
    kc = torch.full((nb, bs, Hkv, D), float("nan"))
    vc = torch.full((nb, bs, Hkv, D), float("nan"))
    ek.store_kvcache_reference(key, value, kc, vc, slots)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(kc[s // bs, s % bs], key[t])
            assert torch.equal(vc[s // bs, s % bs], value[t])
    assert int(torch.isnan(kc).flatten(0, 1).all(dim=(1, 2)).sum()) == nb * bs - 4


# ---------------------------------------------------------------------------------------------
# Triton kernels under the interpreter


@needs_triton
@pytest.mark.parametrize("T,K,S,bm,small", [(3, 2, 5, 16, True), (40, 4, 7, 16, False),
                                            (200, 2, 33, 32, False), (16, 8, 128, 16, True),
                                            (300, 4, 37, 16, True)])
def test_moe_align_triton(interp, monkeypatch, T, K, S, bm, small):
    if not small:
        monkeypatch.setattr(interp, "_ONE_CTA_MAX_PAIRS", 0)          # force the 3-kernel path
    g = _gen("align", T, K, S, bm)
    slots = torch.randint(-1, S, (T, K), generator=g, dtype=torch.int32)
    sorted_ids, block_slot = interp.moe_align(slots, S, bm)
    P = T * K
    flat = slots.flatten()
    rows = sorted_ids.view(-1, bm)
    seen = torch.zeros(P, dtype=torch.int64)
    real_blocks = 0
    for b, s in enumerate(block_slot.tolist()):
        if s < 0:
            continue
        real_blocks += 1
        ids = rows[b]
        real = ids[ids < P]
        assert torch.all(ids[ids >= P] == P), "padding rows must hold the sentinel"
        assert torch.all(flat[real.long()] == s)
        seen[real.long()] += 1
    assert torch.equal(seen, (flat >= 0).long()), "every kept pair exactly once"
    counts = torch.bincount(flat[flat >= 0].long(), minlength=S)
    assert real_blocks == int(((counts + bm - 1) // bm).sum())
    used = block_slot[block_slot >= 0]
    assert torch.all(used[1:] >= used[:-1]) and torch.all(block_slot[real_blocks:] == -1)


MOE_TRITON_CASES = [
    # T, K, S, H, I, skip, config (None: heuristic)
    (1, 2, 4, 64, 32, 0.0, None),
    (13, 3, 6, 48, 40, 0.3, {"BLOCK_M": 16,
                             "up": {"BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2},
                             "down": {"BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}}),
    (70, 2, 5, 32, 32, 0.2, {"BLOCK_M": 32,
                             "up": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 3},
                             "down": {"BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 3}}),
]


@needs_triton
@pytest.mark.parametrize("T,K,S,H,I,skip,config", MOE_TRITON_CASES)
def test_fused_moe_triton(interp, T, K, S, H, I, skip, config):
    x, w13, w2, weights, slots = _moe_inputs(T, K, S, H, I, torch.float16, skip, "triton")
    out = torch.full((T, H), float("nan"), dtype=torch.float16)
    got = ek.fused_moe(x, w13, w2, weights, slots, config=config, out=out)
    assert got.data_ptr() == out.data_ptr() and not torch.isnan(got).any()
    ref = ek.fused_moe_reference(x, w13, w2, weights, slots)
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * scale)
    assert torch.all(got[(slots < 0).all(dim=1)] == 0)


@needs_triton
@pytest.mark.parametrize("T,E,K,renorm,dtype", [(1, 8, 2, True, torch.float32),
                                                (37, 60, 4, False, torch.bfloat16),
                                                (20, 128, 8, True, torch.float16)])
def test_topk_route_triton(interp, T, E, K, renorm, dtype):
    logits = _distinct_logits(T, E, _gen("route_tr", T, E, K), dtype)
    w, ids = ek.topk_route(logits, K, renorm)
    rw, rids = ek.topk_route_reference(logits, K, renorm)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_kvcache_triton(interp, dtype):
    g = _gen("store_tr", dtype)
    T, Hkv, D, nb, bs = 7, 3, 24, 6, 4
    kv = torch.randn(T, 2, Hkv, D, generator=g).to(dtype)       # strided key/value views
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.tensor([5, -1, 0, 23, 11, -1, 12], dtype=torch.int64)
    kc = torch.full((nb, bs, Hkv, D), float("nan"), dtype=dtype)
    vc = kc.clone()
    ek.store_kvcache(key, value, kc, vc, slots)
    rk = torch.full_like(kc, float("nan"))
    rv = rk.clone()
    ek.store_kvcache_reference(key, value, rk, rv, slots)
    torch.testing.assert_close(kc, rk, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(vc, rv, equal_nan=True, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("case", list(ATTN_CASES))
@pytest.mark.parametrize("path", ["prefill", "decode"])
@pytest.mark.parametrize("two_phase,kv_fastest", [(True, False), (False, True)])
def test_paged_attention_triton(interp, monkeypatch, case, path, two_phase, kv_fastest):
    seq_lens, q_lens, Hq, Hkv, D, bs = ATTN_CASES[case]
    for cfg in (ek.attention.DECODE_CFG, ek.attention.PREFILL_CFG):
        monkeypatch.setitem(cfg, "two_phase", two_phase)
        monkeypatch.setitem(cfg, "kv_fastest", kv_fastest)
    if path == "decode":
        q_lens = [1] * len(seq_lens)
        # tiny tiles so that the contexts are split over several programs
        monkeypatch.setitem(ek.attention.DECODE_CFG, "BLOCK_N", 8)
        monkeypatch.setitem(ek.attention.DECODE_CFG, "min_tiles_per_split", 1)
    else:
        monkeypatch.setitem(ek.attention.PREFILL_CFG, "BLOCK_R", 16)
        monkeypatch.setitem(ek.attention.PREFILL_CFG, "BLOCK_N", 16)
    q, kc, vc, bt, qsl, sl, _, _ = _attn_case(seq_lens, q_lens, Hq, Hkv, D, bs,
                                              torch.float16, path)
    scale = D ** -0.5
    max_q = max(q_lens)
    out = torch.full_like(q, float("nan"))
    got = ek.paged_attention(q, kc, vc, bt, qsl, sl, scale, max_q, max(seq_lens) + 5, out=out)
    assert got.data_ptr() == out.data_ptr() and not torch.isnan(got).any()
    ref = ek.paged_attention_reference(q, kc, vc, bt, qsl, sl, scale, max_q, max(seq_lens))
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
    if path == "decode" and max(seq_lens) > 8:
        splits = ek.attention.decode_split(len(seq_lens), Hkv, max(seq_lens) + 5, q.device)
        assert splits > 1, "the split-KV merge path must be exercised"
    if path == "decode":  # graphs sized for a far longer context: each request's own context is split
        long = ek.paged_attention(q, kc, vc, bt, qsl, sl, scale, 1, 4096)
        torch.testing.assert_close(long.float(), ref.float(), rtol=1e-2, atol=1e-2)


@needs_triton
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_paged_attention_tile_map_equals_per_request_grid(interp, monkeypatch, case):
    """A mixed-step CUDA graph's grid: programs read (request, query tile) from a tile map sized for a larger
    batch (padding query rows, requests without queries, programs with nothing to do) and compute exactly
    what the per-request grid computes for the real rows."""
    seq_lens, q_lens, Hq, Hkv, D, bs = ATTN_CASES[case]
    monkeypatch.setitem(ek.attention.PREFILL_CFG, "BLOCK_R", 16)
    monkeypatch.setitem(ek.attention.PREFILL_CFG, "BLOCK_N", 16)
    q, kc, vc, bt, qsl, sl, _, _ = _attn_case(seq_lens, q_lens, Hq, Hkv, D, bs, torch.float16, "tile_map")
    scale, (T, B) = D ** -0.5, (q.shape[0], len(seq_lens))
    want = ek.paged_attention(q, kc, vc, bt, qsl, sl, scale, max(max(q_lens), 2), max(seq_lens))
    pad_rows, pad_reqs = 5, 3
    q_pad = torch.cat([q, torch.randn(pad_rows, Hq, D).to(q.dtype)])
    qsl_pad = torch.cat([qsl, torch.full((pad_reqs,), T, dtype=torch.int32)])
    sl_pad = torch.cat([sl, torch.zeros(pad_reqs, dtype=torch.int32)])
    bt_pad = torch.cat([bt, torch.zeros(pad_reqs, bt.shape[1], dtype=torch.int32)])
    tile = ek.attention.prefill_tile_queries(Hq, Hkv)
    programs = -(-(T + pad_rows) // tile) + B + pad_reqs
    tile_map = torch.from_numpy(ek.attention.prefill_tile_map(qsl_pad.numpy(), tile, programs))
    assert int((tile_map[:, 0] >= 0).sum()) == sum(-(-n // tile) for n in q_lens)
    got = ek.paged_attention(q_pad, kc, vc, bt_pad, qsl_pad, sl_pad, scale, T + pad_rows, 4096,
                             out=torch.full_like(q_pad, float("nan")), tile_map=tile_map)
    assert torch.equal(got[:T], want)
    with pytest.raises(ValueError, match="do not fit"):
        ek.attention.prefill_tile_map(qsl.numpy(), tile, 1)


@needs_triton
@pytest.mark.parametrize("M,N,K,bias", [(1, 40, 64, False), (5, 128, 200, True), (16, 48, 256, False),
                                        (33, 24, 96, True)])
def test_skinny_linear_triton(interp, monkeypatch, M, N, K, bias):
    """The decode batches' linear kernel against F.linear in fp32 (fp16 operands: see the module docstring),
    every output element written; a 3-d input keeps its leading dims; more rows than SKINNY_MAX_ROWS, and
    fp32, take F.linear itself."""
    from importlib import import_module
    lin = import_module(ek.__name__ + ".linear")
    monkeypatch.setattr(lin, "_alloc", poisoned)
    g = _gen("linear", M, N, K, bias)
    x = torch.randn(M, K, generator=g).half()
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).half()
    b = torch.randn(N, generator=g).half() if bias else None
    assert lin.uses_skinny(x, w)
    out = lin.linear(x, w, b)
    want = F.linear(x.float(), w.float(), b.float() if bias else None)
    assert out.dtype == torch.float16 and out.shape == (M, N)
    torch.testing.assert_close(out.float(), want, rtol=2e-3, atol=2e-3)
    assert torch.equal(lin.linear(x.view(1, M, K), w, b), out.view(1, M, N))
    tall = torch.randn(lin.SKINNY_MAX_ROWS + 1, K, generator=g).half()
    assert not lin.uses_skinny(tall, w) and not lin.uses_skinny(x.float(), w.float())
    assert torch.equal(lin.linear(x.float(), w.float()), F.linear(x.float(), w.float()))


def test_every_triton_kernel_waits_first_and_launches_with_pdl():
    """Programmatic dependent launch is exact only if every kernel launched with it waits for the kernel ahead
    before touching memory (kernels/pdl_triton.py): each *_kernel of the Triton modules takes USE_PDL and opens
    with pdl_enter(USE_PDL), and each launch of one passes **pdl(...)."""
    import ast
    launches = 0
    for path in sorted(KERNELS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")):
            assert "USE_PDL" in [a.arg for a in fn.args.args], f"{path.name}:{fn.name} takes no USE_PDL"
            body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            first = body[0]
            assert (isinstance(first, ast.Expr) and isinstance(first.value, ast.Call)
                    and getattr(first.value.func, "id", None) == "pdl_enter"), f"{path.name}:{fn.name} waits late"
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)):
            name = getattr(call.func.value, "id", "")
            if name.endswith("_kernel"):
                launches += 1
                pdl_args = [k for k in call.keywords if k.arg is None and isinstance(k.value, ast.Call)
                            and getattr(k.value.func, "id", None) == "pdl"]
                assert pdl_args, f"{path.name}: a launch of {name} without **pdl(...)"
    assert launches >= 20
