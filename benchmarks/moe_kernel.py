"""MoE layer benchmark (and config tuner) for elastic's fused MoE Triton kernels.

    PYTHONPATH=$PWD python benchmarks/moe_kernel.py --out moe.json
    PYTHONPATH=$PWD python benchmarks/moe_kernel.py --tune --shapes qwen3-30b-a3b --out moe.json
    PYTHONPATH=$PWD python benchmarks/moe_kernel.py --tune --no-bench --ep 2 --shapes qwen3-30b-a3b --tokens 2,4,128

For every shape and token count it times, in the same run: ours (fused_moe), torch._grouped_mm
(sort + gather + 2 grouped GEMMs + SiLU-mul + weighted scatter-add, when available), a
per-expert torch loop, and the HBM floor = (bytes of the distinct experts touched + activations)
/ bandwidth of a large device-to-device copy measured in the same run. Ours and grouped_mm run
from CUDA graphs (ours must be capturable anyway); inputs rotate over several routing sets so
that consecutive calls touch different experts and small cases do not run from L2.
--tune searches launch configurations per token bucket and writes kernels/configs/*.json; with --ep N, for one
rank's share of the experts under expert parallelism (E/N slots, each row's experts mostly elsewhere).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name: (hidden H, experts E, top-k K, expert intermediate I)
    "qwen3-30b-a3b": (2048, 128, 8, 768),
    "olmoe": (2048, 64, 8, 1024),
    "mixtral": (4096, 8, 2, 14336),
    "qwen2-moe": (2048, 60, 4, 1408),
    "deepseek-v2-lite": (2048, 64, 6, 1408),
}
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def load_kernels():
    """`elastic.kernels` when installed, else this checkout's kernels/ folder."""
    try:
        return importlib.import_module("elastic.kernels")
    except Exception:  # not installed (or the engine package is not importable here)
        name = "elastic_kernels_checkout"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod


def submodule(ek, name: str):
    return importlib.import_module(f"{ek.__name__}.{name}")


# --------------------------------------------------------------------------- inputs and timing

def make_weights(H, S, I, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = torch.randn(S, 2 * I, H, device="cuda", dtype=dtype, generator=g) / math.sqrt(H)
    w2 = torch.randn(S, H, I, device="cuda", dtype=dtype, generator=g) / math.sqrt(I)
    return w13, w2


def make_sets(T, H, S, K, n_sets, dtype=torch.bfloat16, seed=1, ep=1):
    """Routing sets: uniformly random distinct experts per token, softmax-like weights. With `ep` ranks, what
    one rank's experts see: T rows (every rank's tokens) choosing among S * ep experts, those outside this
    rank's S slots -1 (skipped), as the expert-parallel exchange hands them over."""
    g = torch.Generator(device="cuda").manual_seed(seed + T)
    sets = []
    for _ in range(n_sets):
        x = torch.randn(T, H, device="cuda", dtype=dtype, generator=g)
        ids = torch.rand(T, S * ep, device="cuda", generator=g).topk(K, dim=1).indices.to(torch.int32)
        ids = torch.where(ids < S, ids, -1)
        w = torch.rand(T, K, device="cuda", generator=g)
        sets.append((x, ids, w / w.sum(1, keepdim=True)))
    return sets


def n_sets_for(T: int) -> int:
    return 8 if T <= 256 else 2


def time_graph(fns, min_ms: float = 20.0, trials: int = 3) -> float:
    """Median ms per call of the callables, replayed from one CUDA graph (they run in a row)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    reps = max(1, min(200, int(min_ms / max(1e-3, (time.perf_counter() - t0) * 1e3))))
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / (reps * len(fns)))
    del graph
    return sorted(times)[len(times) // 2]


def time_eager(fns, trials: int = 3) -> float:
    for f in fns:
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for f in fns:
            f()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_eager([lambda: dst.copy_(src)] * 10, trials=5)
    del src, dst
    return 2 * n / (ms * 1e-3)


# --------------------------------------------------------------------------- baselines

def grouped_mm_moe(x, w13, w2, w, ids):
    """torch._grouped_mm pipeline; sync-free so it can be graph-captured like ours."""
    T, K = ids.shape
    S, I = w13.shape[0], w2.shape[2]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat)
    counts = torch.zeros(S, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tok = order // K
    gu = torch._grouped_mm(x[tok], w13.transpose(1, 2), offs=offs)            # [P, 2I]
    h = F.silu(gu[:, :I]) * gu[:, I:]
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)                   # [P, H]
    y = y.float() * w.reshape(-1)[order, None]
    return torch.zeros(T, x.shape[1], device=x.device).index_add_(0, tok, y).to(x.dtype)


def loop_moe(x, w13, w2, w, ids):
    """Per-expert torch loop in the activation dtype (host syncs on the counts)."""
    T, K = ids.shape
    I = w2.shape[2]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    out = torch.zeros(T, x.shape[1], device=x.device, dtype=torch.float32)
    start = 0
    for s, c in enumerate(counts):
        if c == 0:
            continue
        p = order[start:start + c]
        start += c
        gu = x[p // K] @ w13[s].t()
        y = (F.silu(gu[:, :I]) * gu[:, I:]) @ w2[s].t()
        out.index_add_(0, p // K, y.float() * w.reshape(-1)[p, None])
    return out.to(x.dtype)


# --------------------------------------------------------------------------- tuning

BM_FOR_ROWS = [(4, [16]), (16, [16, 32]), (64, [32, 64]), (float("inf"), [64, 128])]
SMALL = [(16, 256, 4, 3), (16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4),
         (64, 128, 4, 5), (64, 256, 4, 3), (128, 128, 4, 3), (128, 64, 4, 4), (32, 256, 4, 3)]
# (BLOCK_N, BLOCK_K, warps, stages); the up kernel's BLOCK_N is per half (gate and up), so
# BN=128 at BM=128 is the usual 128x256 Hopper tile.
UP_LARGE = [(64, 64, 4, 4), (64, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 8, 3),
            (128, 64, 4, 3), (64, 128, 4, 3)]
DOWN_LARGE = [(64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3),
              (256, 64, 8, 3), (256, 64, 8, 4), (64, 128, 4, 3)]


def candidates(bm: int, kind: str) -> list[dict]:
    if bm <= 32:
        lst, group = SMALL, 1 if bm == 16 else 4
    else:
        lst, group = (UP_LARGE if kind == "up" else DOWN_LARGE), 8
        # accumulator elements per thread above 128 (x2 for up's two halves) spill registers
        per_thread = lambda c: bm * c[0] * (2 if kind == "up" else 1) // (32 * c[2])  # noqa: E731
        lst = [c for c in lst if per_thread(c) <= 128]
    return [{"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": group, "num_warps": wp, "num_stages": st}
            for n, k, wp, st in lst]


def bm_choices(T: int, K: int, S: int) -> list[int]:
    rows = T * K / S
    return next(c for lim, c in BM_FOR_ROWS if rows <= lim)


def _compile_jobs(jobs):
    """Worker: compile (by running once on a 1-token, 1-slot problem) the given kernels."""
    ek = load_kernels()
    mt = submodule(ek, "moe_triton")
    done = 0
    for H, I, bm, kind, g in jobs:
        w13, w2 = make_weights(H, 1, I)
        x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
        ids = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
        sid, bslot = mt.moe_align(ids, 1, bm)
        try:
            if kind == "up":
                mt.moe_up(x, w13, sid, bslot, 1, bm, g)
            else:
                inter = torch.zeros(sid.numel(), I, device="cuda", dtype=torch.bfloat16)
                mt.moe_down(inter, w2, sid, bslot, torch.ones(1, 1, device="cuda"), bm, g)
            done += 1
        except Exception:  # e.g. out of shared memory: the tuner skips it later
            pass
    torch.cuda.synchronize()
    return done


def precompile(jobs, workers: int = 14) -> None:
    """Triton compiles one config at a time per process; fill its disk cache in parallel."""
    if not jobs:
        return
    import multiprocessing as mp
    chunks = [jobs[i::workers] for i in range(min(workers, len(jobs)))]
    with ProcessPoolExecutor(len(chunks), mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_compile_jobs, chunks))


def shape_of(name: str, ep: int) -> tuple[int, int, int, int]:
    """(H, slots per rank, K, I) of a shape whose experts spread over `ep` ranks."""
    H, E, K, I = SHAPES[name]
    return H, -(-E // ep), K, I


def prepare(mt, sets, w13, K: int, bm: int) -> list[tuple]:
    """Per routing set, what the GEMMs take at BLOCK_M `bm`: (x, sorted ids, block slots, weights, the up GEMM's
    output for the down GEMM), computed once for every candidate configuration."""
    out = []
    for x, ids, w in sets:
        sid, bs = mt.moe_align(ids, w13.shape[0], bm)
        out.append((x, sid, bs, w, mt.moe_up(x, w13, sid, bs, K, bm, candidates(bm, "up")[0])))
    return out


def time_gemm(mt, kind: str, prepared: list[tuple], w13, w2, K: int, bm: int, g: dict) -> float:
    """ms per call of the up or down GEMM with BLOCK_M `bm` and launch config `g`, over prepare()'s sets."""
    if kind == "up":
        fns = [lambda x=x, sid=sid, bs=bs: mt.moe_up(x, w13, sid, bs, K, bm, g) for x, sid, bs, _, _ in prepared]
    else:
        fns = [lambda a=a, sid=sid, bs=bs, w=w: mt.moe_down(a, w2, sid, bs, w, bm, g)
               for _, sid, bs, w, a in prepared]
    return time_graph(fns, min_ms=10, trials=3)


def tune_shape(ek, name, tokens, log, ep=1) -> dict:
    H, S, K, I = shape_of(name, ep)
    mt = submodule(ek, "moe_triton")
    w13, w2 = make_weights(H, S, I)
    jobs = {(bm, kind, tuple(sorted(g.items())))
            for T in tokens for bm in bm_choices(T, K, S * ep)
            for kind in ("up", "down") for g in candidates(bm, kind)}
    t0 = time.time()
    try:
        precompile([(H, I, bm, kind, dict(g)) for bm, kind, g in sorted(jobs)])
    except Exception as exc:  # fall back to compiling serially on first use
        log(f"[tune {name}] parallel precompile failed: {type(exc).__name__}: {exc}")
    log(f"[tune {name}] precompiled {len(jobs)} kernels in {time.time() - t0:.0f}s")
    table = {}
    for T in tokens:
        sets = make_sets(T, H, S, K, 4, ep=ep)
        best = None
        for bm in bm_choices(T, K, S * ep):  # (rows per slot: a rank holds 1 / ep of the experts)
            res, prepared = {}, prepare(mt, sets, w13, K, bm)
            for kind in ("up", "down"):
                scored = []
                for g in candidates(bm, kind):
                    try:
                        scored.append((time_gemm(mt, kind, prepared, w13, w2, K, bm, g), g))
                    except Exception as exc:  # e.g. out of shared memory for this config
                        log(f"[tune {name}] T={T} bm={bm} {kind} {g}: {type(exc).__name__}")
                scored.sort(key=lambda r: r[0])
                res[kind] = scored[0]
            total = res["up"][0] + res["down"][0]
            if best is None or total < best[0]:
                best = (total, {"BLOCK_M": bm, "up": res["up"][1], "down": res["down"][1]})
            log(f"[tune {name}] T={T} BM={bm}: up {res['up'][0] * 1e3:.1f} us "
                f"down {res['down'][0] * 1e3:.1f} us")
        before = ek.get_moe_config(T, K, S, I, torch.bfloat16, torch.device("cuda"))  # (the table being replaced)
        prepared = prepare(mt, sets, w13, K, before["BLOCK_M"])
        before_ms = sum(time_gemm(mt, kind, prepared, w13, w2, K, before["BLOCK_M"], before[kind])
                        for kind in ("up", "down"))
        table[str(T)] = best[1]
        log(f"[tune {name}] T={T}: {best[0] * 1e3:.1f} us (up + down; the config before: {before_ms * 1e3:.1f} us)  "
            f"{json.dumps(best[1])}")
    return table


def write_table(ek, name, table, out_dir: Path, ep=1) -> Path:
    H, S, K, I = shape_of(name, ep)
    cfg = submodule(ek, "moe_config")
    path = out_dir / cfg.config_file_name(S, I, cfg.device_name_for(torch.device("cuda")),
                                          torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f' "{k}": {json.dumps(v)}' for k, v in table.items()]     # one bucket per line
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    cfg.load_table.cache_clear()
    return path


# --------------------------------------------------------------------------- benchmark

def bench_shape(ek, name, tokens, bw, log) -> list[dict]:
    H, S, K, I = SHAPES[name]
    w13, w2 = make_weights(H, S, I)
    has_gmm = hasattr(torch, "_grouped_mm")
    rows = []
    for T in tokens:
        sets = make_sets(T, H, S, K, n_sets_for(T))
        distinct = sum(torch.unique(ids).numel() for _, ids, _ in sets) / len(sets)
        floor_bytes = distinct * 3 * I * H * 2 + 2 * T * H * 2
        row = {"shape": name, "tokens": T, "distinct_experts": distinct,
               "floor_ms": floor_bytes / bw * 1e3}
        row["ours_ms"] = time_graph([lambda s=s: ek.fused_moe(s[0], w13, w2, s[2], s[1])
                                     for s in sets])
        row["config"] = ek.get_moe_config(T, K, S, I, torch.bfloat16, torch.device("cuda"))
        row["grouped_mm_ms"] = None
        if has_gmm:
            try:
                row["grouped_mm_ms"] = time_graph(
                    [lambda s=s: grouped_mm_moe(s[0], w13, w2, s[2], s[1]) for s in sets])
            except Exception as exc:
                log(f"[bench {name}] T={T} grouped_mm failed: {type(exc).__name__}: {exc}"[:300])
                has_gmm = False
        row["loop_ms"] = time_eager([lambda s=s: loop_moe(s[0], w13, w2, s[2], s[1])
                                     for s in sets[:2]], trials=2)
        row["ours_vs_floor_pct"] = 100 * row["floor_ms"] / row["ours_ms"]
        rows.append(row)
        gm = row["grouped_mm_ms"]
        log(f"{name:14s} {T:5d} {row['ours_ms']:9.4f} {gm if gm is None else round(gm, 4)!s:>9} "
            f"{row['loop_ms']:9.3f} {row['floor_ms']:9.4f} {row['ours_vs_floor_pct']:6.1f}%")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="qwen3-30b-a3b,olmoe,mixtral")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--out", default=None, help="JSON results path")
    ap.add_argument("--tune", action="store_true", help="search configs, write kernels/configs")
    ap.add_argument("--tune-dir", default=str(ROOT / "kernels" / "configs"))
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--ep", type=int, default=1, help="tune one rank's share of the experts over this many ranks "
                    "(--tokens: rows a rank's experts see, every rank's tokens); with --no-bench")
    args = ap.parse_args()
    if args.ep > 1 and not args.no_bench:
        ap.error("--ep tunes only: add --no-bench")
    ek = load_kernels()
    names = args.shapes.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]

    def log(msg: str) -> None:
        print(msg, flush=True)

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "tuned": {}, "rows": []}
    import triton
    result["triton"] = triton.__version__
    if args.tune:
        for name in names:
            table = tune_shape(ek, name, tokens, log, args.ep)
            result["tuned"][name] = str(write_table(ek, name, table, Path(args.tune_dir), args.ep))
    if not args.no_bench:
        bw = copy_bandwidth()
        result["copy_bandwidth_GBps"] = bw / 1e9
        log(f"device-to-device copy bandwidth: {bw / 1e9:.0f} GB/s")
        log(f"{'shape':14s} {'tok':>5s} {'ours_ms':>9s} {'gmm_ms':>9s} {'loop_ms':>9s} "
            f"{'floor_ms':>9s} {'%floor':>7s}")
        for name in names:
            result["rows"] += bench_shape(ek, name, tokens, bw, log)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
