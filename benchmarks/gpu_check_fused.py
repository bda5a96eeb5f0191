"""Correctness (and decode cost) of the small fused kernels on a GPU, bf16, Qwen3-30B-A3B shapes:
RMSNorm (plain / strided rows / per head / fused with the residual add), rotary and per-head
q/k norm + rotary (also writing k and v into the paged cache), and routing to physical expert
slots (replicas, EP-local slots, load counts).

    PYTHONPATH=$PWD python benchmarks/gpu_check_fused.py [--out fused.json] [--no-bench]
    python benchmarks/gpu_check_fused.py --smoke      # CPU, Triton interpreter, fp16: script check

Outputs are poisoned with NaN (floats) / 2**30 (ints) before the kernels run, so an element that
is never written fails. A CUDA-graph replay is compared with eager references. Then (unless
--no-bench) the per-layer chain of these ops is timed from a CUDA graph, old torch code vs fused
kernels, with kernel counts from the profiler. A table is printed last; exit status 1 on failure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import zlib
from pathlib import Path

if "--smoke" in sys.argv:                 # the interpreter must be on before Triton modules load
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["ELASTIC_TRITON_ON_CPU"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_kernel import load_kernels, submodule, time_graph  # noqa: E402

ek = load_kernels()
norm, rotary, routing = (submodule(ek, name) for name in ("norm", "rotary", "routing"))
# Qwen3-30B-A3B: hidden, q heads, kv heads, head_dim, experts, top-k, eps, rope theta, positions
H, HQ, HKV, D, E, K, EPS, THETA, P = 2048, 32, 4, 128, 128, 8, 1e-6, 1e6, 40960
LAYERS = 48
REDUNDANT, RANKS = 8, 2                   # 136 physical slots over 2 EP ranks: 68 per rank
TOL = 1e-2                                # relative (norm) error vs the torch reference
RESULTS: list[dict] = []


def poisoned(*shape, dtype, device=None):
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(2**30)


for _mod in (norm, rotary, routing):
    _mod._alloc = poisoned


def record(kernel: str, case: str, got: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    written = not torch.isnan(got.float()).any().item()
    diff = (got.float() - ref.float()).nan_to_num(float("inf"))
    rel = (diff.norm() / ref.float().norm().clamp_min(1e-12)).item()
    same = (got == ref).float().mean().item() if got.shape == ref.shape else 0.0
    ok = written and rel <= tol and got.dtype == ref.dtype and got.shape == ref.shape
    RESULTS.append({"kernel": kernel, "case": case, "rel_err": rel, "bit_equal_frac": same,
                    "all_written": written, "pass": ok})
    print(f"{'ok  ' if ok else 'FAIL'} {kernel:22s} {case:34s} rel={rel:.2e} bit-equal={same:6.1%} "
          f"written={written}", flush=True)


def record_exact(kernel: str, case: str, ok: bool) -> None:
    RESULTS.append({"kernel": kernel, "case": case, "rel_err": 0.0 if ok else float("nan"),
                    "bit_equal_frac": 1.0 if ok else 0.0, "all_written": ok, "pass": ok})
    print(f"{'ok  ' if ok else 'FAIL'} {kernel:22s} {case:34s} exact={ok}", flush=True)


def guarded(fn):
    """A crashing check is a failed row, not a crashed script."""
    def run(*args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            record_exact(fn.__name__, f"raised {type(e).__name__}", False)
    return run


def gen(dev: str, *key) -> torch.Generator:
    return torch.Generator(device=dev).manual_seed(zlib.crc32(repr(key).encode()))


def rope_tables(dev: str) -> tuple[torch.Tensor, torch.Tensor]:
    """As elastic.layers.rotary.RotaryEmbedding builds them: [P, D/2] fp32."""
    inv_freq = 1.0 / (THETA ** (torch.arange(0, D, 2, dtype=torch.float32, device=dev) / D))
    freqs = torch.outer(torch.arange(P, dtype=torch.float32, device=dev), inv_freq)
    return freqs.cos(), freqs.sin()


def placement(dev: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled placement of E experts on E + REDUNDANT slots -> (l2p [E, R] int64, counts [E])."""
    g = torch.Generator().manual_seed(7)
    num_physical = E + REDUNDANT
    p2l = torch.cat([torch.arange(E), torch.randint(0, E, (REDUNDANT,), generator=g)])
    p2l = p2l[torch.randperm(num_physical, generator=g)]
    counts = torch.bincount(p2l, minlength=E)
    l2p = torch.full((E, int(counts.max())), -1, dtype=torch.long)
    filled = [0] * E
    for slot, e in enumerate(p2l.tolist()):
        l2p[e, filled[e]] = slot
        filled[e] += 1
    return l2p.to(dev), counts.to(dev)


def distinct_logits(T: int, dev: str, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Router logits without ties even in bf16, so that top-k ids are unambiguous."""
    rows = torch.argsort(torch.rand(T, E, device=dev, generator=g), dim=1).float()
    return ((rows - E / 2) * 0.05).to(dtype)


@guarded
def check_norm(dev: str, dtype: torch.dtype, tokens: list[int]) -> None:
    for T in tokens:
        g = gen(dev, "norm", T)
        x = (torch.randn(T, H, device=dev, generator=g) * 2).to(dtype)
        r = torch.randn(T, H, device=dev, generator=g).to(dtype)
        w = (1 + 0.1 * torch.randn(H, device=dev, generator=g)).to(dtype)
        record("rms_norm", f"[{T}, {H}]", norm.rms_norm(x, w, EPS), norm.rms_norm_reference(x, w, EPS))
        got, got_res = norm.fused_add_rms_norm(x, r, w, EPS)
        ref, ref_res = norm.fused_add_rms_norm_reference(x, r, w, EPS)
        record_exact("fused_add residual", f"[{T}, {H}]", torch.equal(got_res, ref_res))
        record("fused_add_rms_norm", f"[{T}, {H}]", got, ref)
        qkv = torch.randn(T, (HQ + 2 * HKV) * D, device=dev, generator=g).to(dtype)
        wd = (1 + 0.1 * torch.randn(D, device=dev, generator=g)).to(dtype)
        q = qkv[:, :HQ * D].view(T, HQ, D)
        record("rms_norm per-head", f"q view [{T}, {HQ}, {D}]", norm.rms_norm(q, wd, EPS),
               norm.rms_norm_reference(q, wd, EPS))
        wq = (1 + 0.1 * torch.randn(HQ * D, device=dev, generator=g)).to(dtype)
        record("rms_norm strided rows", f"q view [{T}, {HQ * D}]", norm.rms_norm(qkv[:, :HQ * D], wq, EPS),
               norm.rms_norm_reference(qkv[:, :HQ * D], wq, EPS))


@guarded
def check_rotary(dev: str, dtype: torch.dtype, tokens: list[int]) -> None:
    cos, sin = rope_tables(dev)
    for T in tokens:
        g = gen(dev, "rope", T)
        qkv = torch.randn(T, (HQ + 2 * HKV) * D, device=dev, generator=g).to(dtype)
        q, k = qkv[:, :HQ * D].view(T, HQ, D), qkv[:, HQ * D:(HQ + HKV) * D].view(T, HKV, D)
        pos = torch.randint(0, P, (T,), device=dev, generator=g)
        qw, kw = ((1 + 0.1 * torch.randn(D, device=dev, generator=g)).to(dtype) for _ in range(2))
        got = rotary.apply_rotary(pos, q, k, cos, sin)
        ref = rotary.apply_rotary_reference(pos, q, k, cos, sin)
        for name, a, b in zip("qk", got, ref):
            record("apply_rotary", f"{name} T={T}", a, b)
        got = rotary.qk_norm_rotary(pos, q, k, qw, kw, EPS, cos, sin)
        ref = rotary.qk_norm_rotary_reference(pos, q, k, qw, kw, EPS, cos, sin)
        for name, a, b in zip("qk", got, ref):
            record("qk_norm_rotary", f"{name} T={T}", a, b)
        check_rotary_into_cache(dev, T, q, k, pos, qw, kw, cos, sin, g)


def check_rotary_into_cache(dev: str, T: int, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, qw: torch.Tensor,
                            kw: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, g: torch.Generator) -> None:
    """The attention layer's fused kernel (norm + rotary, k and v written into the paged cache) against the two
    kernels it replaces: bit for bit, q and both caches (a padding row's slot -1 writes nothing)."""
    from elastic.kernels.attention import store_kvcache

    block_size = 16
    v = torch.randn(T, HKV, D, device=dev, generator=g).to(q.dtype)
    slots = torch.randperm(2 * T * block_size, device=dev, generator=g)[:T]
    slots[T // 2] = -1
    caches = [torch.full((2 * T, block_size, HKV, D), 7.0, dtype=q.dtype, device=dev) for _ in range(4)]
    got_q = rotary.qk_rotary_store(pos, q, k, v, cos, sin, caches[0], caches[1], slots, qw, kw, EPS)
    ref_q, ref_k = rotary.qk_norm_rotary(pos, q, k, qw, kw, EPS, cos, sin)
    store_kvcache(ref_k, v, caches[2], caches[3], slots)
    same = torch.equal(got_q, ref_q) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    record_exact("qk_rotary_store", f"T={T} = norm+rotary, then store", same)


@guarded
def check_routing(dev: str, dtype: torch.dtype, tokens: list[int]) -> None:
    l2p, counts = placement(dev)
    num_physical = E + REDUNDANT
    spr = num_physical // RANKS
    for T in tokens:
        g = gen(dev, "route", T)
        for kind, logits in (("f32 randn", torch.randn(T, E, device=dev, generator=g)),
                             (f"{str(dtype)[6:]} distinct", distinct_logits(T, dev, dtype, g))):
            for rank in range(RANKS):
                load = torch.randint(0, 9, (num_physical,), device=dev, generator=g)
                ref_load = load.clone()
                got = routing.route_to_slots(logits, K, True, l2p, counts, load, rank * spr, spr)
                ref = routing.route_to_slots_reference(logits, K, True, l2p, counts, ref_load, rank * spr, spr)
                case = f"T={T} {kind} rank {rank}"
                record("route_to_slots w", case, got[0], ref[0], 1e-5)
                record_exact("route_to_slots slots", case, torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2]))
                record_exact("route_to_slots load", case, torch.equal(load, ref_load))
            got = routing.route_to_slots(logits, K, False, l2p, counts, None, 0, num_physical)
            ref = routing.route_to_slots_reference(logits, K, False, l2p, counts, None, 0, num_physical)
            record_exact("route_to_slots no-load", f"T={T} {kind} no renorm",
                         torch.allclose(got[0], ref[0], rtol=1e-5, atol=1e-7) and torch.equal(got[1], ref[1])
                         and torch.equal(got[2], ref[2]))


def _layer_inputs(dev: str, dtype: torch.dtype, T: int, g: torch.Generator) -> dict:
    qkv = torch.randn(T, (HQ + 2 * HKV) * D, device=dev, generator=g).to(dtype)
    return {"x": torch.randn(T, H, device=dev, generator=g).to(dtype),
            "r": torch.randn(T, H, device=dev, generator=g).to(dtype),
            "qkv": qkv, "pos": torch.randint(0, P, (T,), device=dev, generator=g),
            "logits": torch.randn(T, E, device=dev, generator=g).to(dtype)}


@guarded
def check_graph(dev: str, dtype: torch.dtype) -> None:
    """Capture the fused ops once, replay on new inputs, compare with eager references."""
    T = 8
    g = gen(dev, "graph")
    cos, sin = rope_tables(dev)
    l2p, counts = placement(dev)
    num_physical = E + REDUNDANT
    w, wd = torch.ones(H, device=dev, dtype=dtype), torch.ones(D, device=dev, dtype=dtype) * 1.5
    static = _layer_inputs(dev, dtype, T, g)
    load = torch.zeros(num_physical, dtype=torch.long, device=dev)

    def step(s: dict) -> tuple:
        normed, res = norm.fused_add_rms_norm(s["x"], s["r"], w, EPS)
        q, k = s["qkv"][:, :HQ * D].view(T, HQ, D), s["qkv"][:, HQ * D:(HQ + HKV) * D].view(T, HKV, D)
        qo, ko = rotary.qk_norm_rotary(s["pos"], q, k, wd, wd, EPS, cos, sin)
        return (normed, res, qo, ko) + routing.route_to_slots(s["logits"], K, True, l2p, counts, load, 0,
                                                                num_physical)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                      # compile + warm up outside the capture
        step(static)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(static)
    fresh = _layer_inputs(dev, dtype, T, g)
    for key, t in fresh.items():
        static[key].copy_(t)
    load.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref_load = torch.zeros_like(load)
    q, k = fresh["qkv"][:, :HQ * D].view(T, HQ, D), fresh["qkv"][:, HQ * D:(HQ + HKV) * D].view(T, HKV, D)
    refs = (norm.fused_add_rms_norm_reference(fresh["x"], fresh["r"], w, EPS)
            + rotary.qk_norm_rotary_reference(fresh["pos"], q, k, wd, wd, EPS, cos, sin)
            + routing.route_to_slots_reference(fresh["logits"], K, True, l2p, counts, ref_load, 0, num_physical))
    names = ["normed", "residual", "q", "k", "route w", "route physical", "route local"]
    for name, a, b in zip(names, outs, refs):
        if a.is_floating_point():
            record("cuda-graph replay", name, a, b)
        else:
            record_exact("cuda-graph replay", name, torch.equal(a, b))
    record_exact("cuda-graph replay", "expert_load", torch.equal(load, ref_load))


# --------------------------------------------------------------------------- decode cost per layer

def _old_route(logits, l2p, counts, load, first, spr):
    """FusedMoE.forward's routing before route_to_slots: Triton top-k, then torch ops."""
    w, ids = ek.topk_route(logits, K, True)
    ids = ids.long()
    replica = torch.arange(logits.shape[0], device=logits.device)[:, None] % counts[ids]
    physical = l2p[ids, replica]
    load.index_add_(0, physical.flatten(), torch.ones_like(physical.flatten()))
    return w, routing.slots_to_local(physical, first, spr)


def _count_kernels(fn) -> int | None:
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as e:  # noqa: BLE001  (the count is informative only)
        print(f"kernel count unavailable: {e}")
        return None


def bench(dev: str, dtype: torch.dtype) -> list[dict]:
    """Per-layer chain of the ops these kernels replace (attention, GEMMs and expert compute left
    out): 2 residual adds + 2 RMSNorms + per-head q/k norms + rotary + routing/slot mapping."""
    cos, sin = rope_tables(dev)
    l2p, counts = placement(dev)
    num_physical = E + REDUNDANT
    w, wd = torch.ones(H, device=dev, dtype=dtype), torch.ones(D, device=dev, dtype=dtype)
    load = torch.zeros(num_physical, dtype=torch.long, device=dev)
    rows = []
    for T in (1, 64):
        s = _layer_inputs(dev, dtype, T, gen(dev, "bench", T))
        q, k = s["qkv"][:, :HQ * D].view(T, HQ, D), s["qkv"][:, HQ * D:(HQ + HKV) * D].view(T, HKV, D)

        def old():
            x = s["r"] + s["x"]
            h = norm.rms_norm_reference(x, w, EPS)
            qn, kn = norm.rms_norm_reference(q, wd, EPS), norm.rms_norm_reference(k, wd, EPS)
            rotary.apply_rotary_reference(s["pos"], qn, kn, cos, sin)
            norm.rms_norm_reference(x + h, w, EPS)
            _old_route(s["logits"], l2p, counts, load, 0, num_physical)

        def new():
            h, res = norm.fused_add_rms_norm(s["x"], s["r"], w, EPS)
            rotary.qk_norm_rotary(s["pos"], q, k, wd, wd, EPS, cos, sin)
            norm.fused_add_rms_norm(h, res, w, EPS)
            routing.route_to_slots(s["logits"], K, True, l2p, counts, load, 0, num_physical)

        row = {"T": T}
        for name, fn in (("old", old), ("new", new)):
            row[f"{name}_us"] = time_graph([fn]) * 1e3
            row[f"{name}_kernels"] = _count_kernels(fn)
        rows.append(row)
        print(f"T={T:3d}: per layer old {row['old_us']:6.1f} us ({row['old_kernels']} kernels) -> new "
              f"{row['new_us']:6.1f} us ({row['new_kernels']} kernels); x{LAYERS} layers: "
              f"{row['old_us'] * LAYERS / 1e3:.2f} -> {row['new_us'] * LAYERS / 1e3:.2f} ms", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter (fp16): checks the script")
    args = ap.parse_args()
    t0 = time.time()
    dev = "cpu" if args.smoke else "cuda"
    dtype = torch.float16 if args.smoke else torch.bfloat16      # the interpreter truncates bf16
    tokens = [1, 5] if args.smoke else [1, 7, 64, 600]
    check_norm(dev, dtype, tokens)
    check_rotary(dev, dtype, tokens)
    check_routing(dev, dtype, tokens)
    bench_rows = []
    if not args.smoke:
        check_graph(dev, dtype)
        if not args.no_bench:
            try:
                bench_rows = bench(dev, dtype)
            except Exception:  # noqa: BLE001  (timings are extra; the checks above decide the status)
                traceback.print_exc()
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                                              "checks": RESULTS, "bench": bench_rows}, indent=1))
    print(f"\n{'kernel':22s} {'case':34s} {'rel_err':>9s} {'bit-eq':>7s} {'written':>7s} pass"
          f"   ({time.time() - t0:.0f}s)")
    for r in RESULTS:
        print(f"{r['kernel']:22s} {r['case']:34s} {r['rel_err']:9.2e} {r['bit_equal_frac']:7.1%} "
              f"{r['all_written']!s:>7s} {'yes' if r['pass'] else 'NO'}")
    for r in bench_rows:
        print(f"per-layer chain T={r['T']}: old {r['old_us']:.1f} us / {r['old_kernels']} kernels, "
              f"new {r['new_us']:.1f} us / {r['new_kernels']} kernels")
    failed = [r for r in RESULTS if not r["pass"]]
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed")
    sys.exit(1 if failed or not RESULTS else 0)


if __name__ == "__main__":
    main()
