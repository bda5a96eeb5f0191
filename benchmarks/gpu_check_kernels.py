"""Correctness of every Triton kernel against the torch references on a GPU (bf16), on the
shapes of every supported family, plus (with --attn-bench) attention timings.

    PYTHONPATH=$PWD python benchmarks/gpu_check_kernels.py [--attn-bench] [--out check.json]

Every output (and every internal buffer of the launchers) is poisoned with NaN before the
kernels run, so an element that is never written, or read before it is written, fails the
check. CUDA-graph replays are compared with eager runs. A short table is printed last; the
exit status is 1 when any check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_kernel import SHAPES, load_kernels, submodule, time_graph  # noqa: E402

ek = load_kernels()
RESULTS: list[dict] = []


def poisoned(*shape, dtype, device=None):
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(2**30)


submodule(ek, "moe_triton")._alloc = poisoned
submodule(ek, "attention")._alloc = poisoned


def record(kernel: str, case: str, got: torch.Tensor, ref: torch.Tensor, tol: float,
           rows: slice | None = None) -> None:
    g = got if rows is None else got[rows]
    r = ref if rows is None else ref[rows]
    written = not torch.isnan(g).any().item()
    diff = (g.float() - r.float()).nan_to_num(float("inf"))
    rel = (diff.norm() / r.float().norm().clamp_min(1e-12)).item()
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    ok = written and rel <= tol
    RESULTS.append({"kernel": kernel, "case": case, "rel_err": rel, "max_abs_err": max_abs,
                    "all_written": written, "pass": ok})
    print(f"{'ok  ' if ok else 'FAIL'} {kernel:16s} {case:44s} rel={rel:.2e} "
          f"max_abs={max_abs:.2e} written={written}", flush=True)


def record_exact(kernel: str, case: str, ok: bool) -> None:
    RESULTS.append({"kernel": kernel, "case": case, "rel_err": 0.0 if ok else float("nan"),
                    "max_abs_err": 0.0 if ok else float("nan"), "all_written": ok, "pass": ok})
    print(f"{'ok  ' if ok else 'FAIL'} {kernel:16s} {case:44s} exact={ok}", flush=True)


def check_moe(name: str) -> None:
    H, E, K, I = SHAPES[name]
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(zlib.crc32(name.encode()))
    w13 = torch.randn(E, 2 * I, H, device=dev, generator=g).div_(math.sqrt(H)).bfloat16()
    w2 = torch.randn(E, H, I, device=dev, generator=g).div_(math.sqrt(I)).bfloat16()
    for T in (1, 7, 64, 600):
        for ep in (False, True):
            x = torch.randn(T, H, device=dev, generator=g).bfloat16()
            logits = torch.randn(T, E, device=dev, generator=g)
            w, ids = ek.topk_route(logits, K, renormalize=True)
            rw, rids = ek.topk_route_reference(logits, K, renormalize=True)
            if not ep:
                record("topk_route", f"{name} T={T}", w, rw, 1e-5)
                record_exact("topk_route ids", f"{name} T={T}", torch.equal(ids, rids))
            if ep:   # this rank holds the first half of the experts only
                ids = torch.where(ids < E // 2, ids, torch.full_like(ids, -1))
            out = torch.full((T, H), float("nan"), device=dev, dtype=torch.bfloat16)
            got = ek.fused_moe(x, w13, w2, w, ids, out=out)
            ref = ek.fused_moe_reference(x, w13, w2, w, ids)
            record("fused_moe", f"{name} T={T}{' ep-half' if ep else ''}", got, ref, 2e-2)
    # CUDA graph: capture once, replay with new inputs copied in, compare with eager.
    T = 8
    x = torch.randn(T, H, device=dev, generator=g).bfloat16()
    w, ids = ek.topk_route(torch.randn(T, E, device=dev, generator=g), K, True)
    static = [x.clone(), w.clone(), ids.clone()]
    ek.fused_moe(*static[:1], w13, w2, static[1], static[2])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gout = ek.fused_moe(static[0], w13, w2, static[1], static[2])
    x2 = torch.randn_like(x)
    w2_, ids2 = ek.topk_route(torch.randn(T, E, device=dev, generator=g), K, True)
    for dst, src in zip(static, (x2, w2_, ids2)):
        dst.copy_(src)
    graph.replay()
    record("fused_moe", f"{name} cuda-graph replay T={T}", gout,
           ek.fused_moe(x2, w13, w2, w2_, ids2), 0.0)


def _paged_case(seq_lens, q_lens, Hq=32, Hkv=4, D=128, bs=16, seed=0, check_store=False):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    B = len(seq_lens)
    nblk = [math.ceil(s / bs) for s in seq_lens]
    num_blocks = sum(nblk) + 7
    perm = torch.randperm(num_blocks, device=dev, generator=g).to(torch.int32)
    tables = torch.zeros(B, max(nblk), dtype=torch.int32, device=dev)
    used = 0
    for b, n in enumerate(nblk):
        tables[b, :n] = perm[used:used + n]
        used += n
    kc = torch.full((num_blocks, bs, Hkv, D), float("nan"), device=dev, dtype=torch.bfloat16)
    vc = kc.clone()
    # fill every context token through store_kvcache (checked against the reference)
    slots = torch.cat([tables[b, torch.arange(s, device=dev) // bs].long() * bs
                       + torch.arange(s, device=dev) % bs for b, s in enumerate(seq_lens)])
    slots[::97] = -1                                             # some padding tokens
    key = torch.randn(slots.numel(), Hkv, D, device=dev, generator=g).bfloat16()
    val = torch.randn(slots.numel(), Hkv, D, device=dev, generator=g).bfloat16()
    ek.store_kvcache(key, val, kc, vc, slots)
    if check_store:
        rk = torch.full_like(kc, float("nan"))
        rv = torch.full_like(vc, float("nan"))
        ek.store_kvcache_reference(key, val, rk, rv, slots)
        same = all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in ((kc, rk), (vc, rv)))
        record_exact("store_kvcache", f"{len(seq_lens)} reqs, {slots.numel()} tokens", same)
    for t in (kc, vc):
        t.nan_to_num_(0.0)        # padding tokens left holes; any value is fine for attention
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32,
                       device=dev)
    q = torch.randn(int(qsl[-1]), Hq, D, device=dev, generator=g).bfloat16()
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    return q, kc, vc, tables, qsl, sl


def check_attention() -> None:
    cases = {
        "decode B=8 mixed lens": ([1, 17, 300, 1024, 4000, 77, 2048, 513], [1] * 8),
        "decode B=64 len<=2048": (torch.randint(1, 2049, (64,), generator=torch.Generator()
                                                .manual_seed(5)).tolist(), [1] * 64),
        "prefill 2 reqs": ([1000, 333], [1000, 333]),
        "chunked prefill ctx 1500+500": ([2000, 700], [500, 700]),
        "mixed prefill+decode": ([900, 51, 4096], [300, 1, 1]),
    }
    for name, (seq_lens, q_lens) in cases.items():
        q, kc, vc, bt, qsl, sl = _paged_case(seq_lens, q_lens, check_store=True)
        scale = 128 ** -0.5
        out = torch.full_like(q, float("nan"))
        got = ek.paged_attention(q, kc, vc, bt, qsl, sl, scale, max(q_lens), max(seq_lens),
                                 out=out)
        ref = ek.paged_attention_reference(q, kc, vc, bt, qsl, sl, scale, max(q_lens),
                                           max(seq_lens))
        record("paged_attention", name, got, ref, 1e-2)
    # decode under a CUDA graph captured with a larger max_seq_len bound than the data
    q, kc, vc, bt, qsl, sl = _paged_case([5, 700, 3000, 64], [1] * 4, seed=3)
    ek.paged_attention(q, kc, vc, bt, qsl, sl, 0.1, 1, 4096)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gout = ek.paged_attention(q, kc, vc, bt, qsl, sl, 0.1, 1, 4096)
    q.copy_(torch.randn_like(q))
    sl.copy_(torch.tensor([6, 701, 2999, 1], dtype=torch.int32))
    graph.replay()
    ref = ek.paged_attention_reference(q, kc, vc, bt, qsl, sl, 0.1, 1, 4096)
    record("paged_attention", "decode cuda-graph replay", gout, ref, 1e-2)


def attn_bench(bw: float) -> list[dict]:
    """Decode (flash-decoding) and prefill timings at Qwen3-30B shapes, with config sweeps."""
    att = submodule(ek, "attention")
    rows = []
    defaults = (dict(att.DECODE_CFG), dict(att.PREFILL_CFG))
    # (BLOCK_N, warps, stages, waves of programs per SM wanted when choosing the split count,
    #  two_phase, kv_fastest) -- see DECODE_CFG in kernels/attention.py
    decode_variants = [(64, 4, 2, 4, False, False), (64, 4, 2, 4, True, False),
                       (64, 4, 2, 4, False, True), (64, 4, 2, 4, True, True),
                       (128, 4, 2, 4, False, True), (32, 4, 2, 4, False, True),
                       (64, 4, 3, 4, False, True), (64, 4, 2, 8, False, True)]
    for B, L in [(1, 8192), (8, 4096), (32, 4096), (64, 2048), (128, 1024), (256, 4096)]:
        kv_bytes = B * L * 4 * 128 * 2 * 2
        n_sets = max(1, min(8, math.ceil(400e6 / kv_bytes)))
        sets = [_paged_case([L] * B, [1] * B, seed=s) for s in range(n_sets)]
        best, sweep = None, {}
        for bn, wp, st, wv, tp, kf in decode_variants:
            att.DECODE_CFG.update(BLOCK_N=bn, num_warps=wp, num_stages=st, waves=wv,
                                  two_phase=tp, kv_fastest=kf)
            ms = time_graph([lambda s=s: ek.paged_attention(s[0], s[1], s[2], s[3], s[4], s[5],
                                                             0.088, 1, L) for s in sets])
            sweep[str((bn, wp, st, wv, tp, kf))] = ms
            if best is None or ms < best[0]:
                best = (ms, (bn, wp, st, wv, tp, kf))
        gbps = kv_bytes / (best[0] * 1e-3) / 1e9
        rows.append({"kind": "decode", "B": B, "L": L, "ms": best[0], "cfg": best[1],
                     "GBps": gbps, "pct_copy_bw": 100 * gbps * 1e9 / bw, "sweep": sweep})
        print(f"decode B={B:4d} L={L:5d} {best[0] * 1e3:8.1f} us {gbps:7.0f} GB/s "
              f"({rows[-1]['pct_copy_bw']:.0f}% of copy) "
              f"cfg(BN,warps,stages,waves,2phase,kvfast)={best[1]}", flush=True)
        del sets
    for ctx, new in [(0, 4096), (2048, 2048)]:
        q, kc, vc, bt, qsl, sl = _paged_case([ctx + new], [new])
        flops = 4 * 32 * 128 * (new * ctx + new * (new + 1) / 2)
        best, sweep = None, {}
        for br, bn, wp, st, tp, kf in [(64, 64, 4, 3, True, False), (64, 64, 4, 3, False, False),
                                       (64, 64, 4, 3, True, True), (128, 128, 8, 2, True, True),
                                       (128, 128, 8, 3, True, True), (64, 128, 4, 3, True, True),
                                       (128, 64, 8, 3, True, True)]:
            att.PREFILL_CFG.update(BLOCK_R=br, BLOCK_N=bn, num_warps=wp, num_stages=st,
                                   two_phase=tp, kv_fastest=kf)
            ms = time_graph([lambda: ek.paged_attention(q, kc, vc, bt, qsl, sl, 0.088, new,
                                                        ctx + new)])
            sweep[str((br, bn, wp, st, tp, kf))] = ms
            if best is None or ms < best[0]:
                best = (ms, (br, bn, wp, st, tp, kf))
        qd = torch.randn(1, 32, new, 128, device="cuda", dtype=torch.bfloat16)
        kd = torch.randn(1, 4, ctx + new, 128, device="cuda", dtype=torch.bfloat16)
        sdpa = None
        if ctx == 0:
            sdpa = time_graph([lambda: torch.nn.functional.scaled_dot_product_attention(
                qd, kd, kd, is_causal=True, enable_gqa=True)])
        rows.append({"kind": "prefill", "ctx": ctx, "new": new, "ms": best[0], "cfg": best[1],
                     "TFLOPs": flops / best[0] / 1e9, "sdpa_dense_ms": sdpa, "sweep": sweep})
        print(f"prefill ctx={ctx} new={new}: {best[0]:.3f} ms {flops / best[0] / 1e9:.0f} "
              f"TFLOP/s cfg(BLOCK_R,BN,warps,stages,2phase,kvfast)={best[1]} "
              f"sdpa(dense, causal)={sdpa}", flush=True)
    att.DECODE_CFG.update(defaults[0])
    att.PREFILL_CFG.update(defaults[1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--attn-bench", action="store_true")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.time()
    if not args.skip_checks:
        for name in args.shapes.split(","):
            check_moe(name)
        check_attention()
    bench = []
    if args.attn_bench:
        from moe_kernel import copy_bandwidth
        bench = attn_bench(copy_bandwidth())
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                              "checks": RESULTS, "attn_bench": bench}, indent=1))
    print(f"\n{'kernel':16s} {'case':44s} {'rel_err':>9s} {'written':>7s} pass   ({time.time() - t0:.0f}s)")
    for r in RESULTS:
        print(f"{r['kernel']:16s} {r['case']:44s} {r['rel_err']:9.2e} {r['all_written']!s:>7s} "
              f"{'yes' if r['pass'] else 'NO'}")
    failed = [r for r in RESULTS if not r["pass"]]
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
