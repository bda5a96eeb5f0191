"""DeepSeek kernels (CPU only): the latent-cache reference against expanded multi-head attention in float64,
grouped routing against transformers' own routers, and the Triton kernels (MLA store and attention, grouped top-k,
ids to slots) under the interpreter against the references (attention in fp16: the interpreter's bf16 tl.dot is
wrong; bf16 is checked on the GPU by benchmarks/gpu_deepseek.sh)."""
from __future__ import annotations

import pytest
import torch
from kernel_testing import gen, load_kernels, needs_triton, poisoned

ek = load_kernels()

# name: (seq_lens, q_lens, heads, kv_lora_rank C, rope dim R, block_size)
CASES = {
    "prefill": ([7, 20], [7, 20], 4, 24, 8, 4),
    "chunked_prefill": ([19, 33], [5, 9], 3, 32, 16, 8),
    "decode": ([1, 9, 40, 17], [1, 1, 1, 1], 16, 32, 16, 4),
    "mixed": ([12, 30, 5], [12, 1, 3], 20, 40, 8, 16),
}


def _case(seq_lens, q_lens, H, C, R, bs, dtype, key):
    """Random latent cache with shuffled blocks (-1 in unused table entries: must never be read)."""
    g = gen("mla", key, H, C, R)
    blocks = [-(-s // bs) for s in seq_lens]
    num_blocks = sum(blocks) + 2
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(seq_lens), max(blocks) + 1), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[used:used + n]
        used += n
    cache = torch.randn(num_blocks, bs, C + R, generator=g).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    T = int(qsl[-1])
    q_lat = torch.randn(T, H, C, generator=g).to(dtype) / C ** 0.25
    q_pe = torch.randn(T, H, R, generator=g).to(dtype)
    return q_lat, q_pe, cache, tables, qsl, torch.tensor(seq_lens, dtype=torch.int32)


def test_absorbed_reference_equals_expanded_attention():
    """out_lat W_UV^T with q_lat = q_nope W_UK is multi-head attention over the expanded per-head K and V."""
    g = gen("expand")
    H, C, R, nope, v, bs = 3, 24, 8, 12, 20, 4
    seq_lens, q_lens = [9, 14], [9, 5]
    _, _, cache, tables, qsl, sl = _case(seq_lens, q_lens, H, C, R, bs, torch.float64, "expand")
    w_uk, w_uv = torch.randn(H, nope, C, generator=g).double(), torch.randn(H, v, C, generator=g).double()
    T = int(qsl[-1])
    q_nope, q_pe = torch.randn(T, H, nope, generator=g).double(), torch.randn(T, H, R, generator=g).double()
    scale = (nope + R) ** -0.5
    q_lat = torch.einsum("thn,hnc->thc", q_nope, w_uk)
    got = torch.einsum("thc,hvc->thv", ek.mla_attention_reference(q_lat, q_pe, cache, tables, qsl, sl, scale, 9, 14),
                       w_uv)
    for b, s in enumerate(seq_lens):
        pos = torch.arange(s)
        rows = cache[tables[b, pos // bs].long(), pos % bs]
        latent, k_pe = rows[:, :C], rows[:, C:]
        k = torch.cat([torch.einsum("lc,hnc->lhn", latent, w_uk), k_pe[:, None].expand(s, H, R)], dim=-1)
        val = torch.einsum("lc,hvc->lhv", latent, w_uv)
        for i in range(int(qsl[b + 1] - qsl[b])):
            t, p = int(qsl[b]) + i, s - int(qsl[b + 1] - qsl[b]) + i
            q = torch.cat([q_nope[t], q_pe[t]], dim=-1)                            # [H, nope + R]
            att = torch.softmax(torch.einsum("hd,lhd->hl", q, k[:p + 1]) * scale, dim=-1)
            # the reference computes in float32
            torch.testing.assert_close(got[t], torch.einsum("hl,lhv->hv", att, val[:p + 1]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("v3", [False, True])
def test_grouped_topk_matches_transformers_routers(v3):
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    g = gen("route", v3)
    E, K, hidden = 16, 4, 32
    common = dict(hidden_size=hidden, n_routed_experts=E, num_experts_per_tok=K, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5)
    if v3:
        router = DeepseekV3TopkRouter(DeepseekV3Config(**common, norm_topk_prob=True))
        router.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
        bias = router.e_score_correction_bias
    else:
        router = DeepseekV2TopkRouter(DeepseekV2Config(**common, topk_method="group_limited_greedy"))
        bias = None
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, hidden, generator=g))
        logits, ref_w, ref_ids = router(torch.randn(40, hidden, generator=g))
    w, ids = ek.routing.grouped_topk(logits, K, v3, "sigmoid" if v3 else "softmax", bias, 4, 2,
                                     "top2_sum" if v3 else "max", 2.5)
    order, ref_order = ids.long().argsort(dim=1), ref_ids.argsort(dim=1)
    assert torch.equal(ids.long().gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order))


@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ELASTIC_TRITON_ON_CPU", "1")
    monkeypatch.setattr(ek.attention, "_alloc", poisoned)  # the decode splits' partial states
    monkeypatch.setattr(ek.routing, "_alloc", poisoned)


@needs_triton
def test_store_latent_triton(interp):
    g = gen("store_latent")
    T, C, R, nb, bs = 7, 24, 8, 5, 4
    latent = torch.randn(T, C + R + 3, generator=g).half()              # strided rows, like the projection's
    c_kv, k_pe = latent[:, :C], torch.randn(T, R, generator=g).half()
    slots = torch.tensor([5, -1, 0, 19, 11, -1, 12], dtype=torch.int64)
    cache = torch.full((nb, bs, C + R), float("nan"), dtype=torch.float16)
    ref = cache.clone()
    ek.store_latent(c_kv, k_pe, cache, slots)
    ek.store_latent_reference(c_kv, k_pe, ref, slots)
    torch.testing.assert_close(cache, ref, equal_nan=True, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_mla_attention_triton(interp, monkeypatch, name):
    seq_lens, q_lens, H, C, R, bs = CASES[name]
    # Tiny tiles, so that decode splits its contexts over several programs and prefill has several head blocks.
    monkeypatch.setitem(ek.mla.DECODE_CFG, "BLOCK_N", 16)
    monkeypatch.setitem(ek.mla.DECODE_CFG, "min_tiles_per_split", 1)
    monkeypatch.setitem(ek.mla.DECODE_CFG, "waves", 16)
    monkeypatch.setitem(ek.mla.DECODE_CFG, "BLOCK_H", 8)
    monkeypatch.setitem(ek.mla.PREFILL_CFG, "BLOCK_H", 8)
    monkeypatch.setitem(ek.mla.PREFILL_CFG, "BLOCK_R", 16)
    monkeypatch.setitem(ek.mla.PREFILL_CFG, "BLOCK_N", 16)
    q_lat, q_pe, cache, tables, qsl, sl = _case(seq_lens, q_lens, H, C, R, bs, torch.float16, name)
    strided_pe = torch.cat([q_pe, q_pe], dim=-1)[..., :R]                    # a view, as the layer passes it
    scale = 0.3
    assert ek.mla.use_triton(q_lat), "the Triton path must run (interpreter)"
    got = ek.mla_attention(q_lat, strided_pe, cache, tables, qsl, sl, scale, max(q_lens), max(seq_lens) + 3)
    assert not torch.isnan(got).any()
    ref = ek.mla_attention_reference(q_lat, q_pe, cache, tables, qsl, sl, scale, max(q_lens), max(seq_lens))
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
    if max(q_lens) == 1:
        splits = ek.mla.mla_decode_split(len(seq_lens) * -(-H // 8), max(seq_lens) + 3, q_lat.device)
        assert splits > 1, "the split-context merge must be exercised"
        # Sized for a much longer context (a CUDA graph of a long-context model): each request's own context
        # is divided among the splits, and splits past a short context stay empty (merged with weight 0).
        long = ek.mla_attention(q_lat, strided_pe, cache, tables, qsl, sl, scale, 1, 4096)
        assert ek.mla.mla_decode_split(len(seq_lens) * -(-H // 8), 4096, q_lat.device) * 16 > min(seq_lens)
        torch.testing.assert_close(long.float(), ref.float(), rtol=1e-2, atol=1e-2)


@needs_triton
@pytest.mark.parametrize("T", [1, 13, 40])
@pytest.mark.parametrize("cfg", [
    dict(E=16, K=4, renorm=True, scoring="sigmoid", bias=True, groups=4, topk_groups=2, score="top2_sum", scale=2.5),
    dict(E=8, K=3, renorm=False, scoring="softmax", bias=False, groups=4, topk_groups=2, score="max", scale=1.5),
    dict(E=64, K=6, renorm=False, scoring="softmax", bias=False, groups=1, topk_groups=1, score="max", scale=1.0),
])
def test_grouped_topk_triton(interp, T, cfg):
    g = gen("grouped_tr", T, tuple(cfg.items()))
    logits = torch.randn(T, cfg["E"], generator=g) * 2
    bias = torch.randn(cfg["E"], generator=g) * 0.3 if cfg["bias"] else None
    args = (logits, cfg["K"], cfg["renorm"], cfg["scoring"], bias, cfg["groups"], cfg["topk_groups"], cfg["score"],
            cfg["scale"])
    w, ids = ek.routing.grouped_topk(*args)
    rw, rids = ek.routing.grouped_topk_reference(*args)
    order, ref_order = ids.long().sort(dim=1)[1], rids.long().sort(dim=1)[1]
    assert torch.equal(ids.gather(1, order), rids.gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), rw.gather(1, ref_order), rtol=1e-5, atol=1e-6)


@needs_triton
def test_ids_to_slots_triton(interp):
    g = gen("ids_to_slots")
    E, S, T, K = 8, 11, 9, 3                                       # 3 experts with a second replica
    p2l = torch.arange(S) % E
    counts = torch.bincount(p2l, minlength=E)
    l2p = torch.full((E, 2), -1, dtype=torch.long)
    for slot, e in enumerate(p2l.tolist()):
        l2p[e, int((l2p[e] >= 0).sum())] = slot
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    valid = torch.tensor([7])
    load, ref_load = torch.zeros(S, dtype=torch.long), torch.zeros(S, dtype=torch.long)
    phys, local = ek.routing.ids_to_slots(ids, l2p, counts, load, 4, 4, valid)
    rphys, rlocal = ek.routing.ids_to_slots_reference(ids, l2p, counts, ref_load, 4, 4, valid)
    assert torch.equal(phys, rphys) and torch.equal(local, rlocal) and torch.equal(load, ref_load)
    assert int(load.sum()) == 7 * K                                # padding rows count no load
