"""The decode linear layers: elastic's skinny Triton kernel against torch's F.linear (cuBLAS) and the HBM floor.

    PYTHONPATH=$PWD python benchmarks/linear_kernel.py --out linear.json
    PYTHONPATH=$PWD python benchmarks/linear_kernel.py --sweep      # + a configuration search per case

For each projection of a model shape (q/k/v, output, router, lm_head) and each row count, in the same run: the
time of F.linear, of `elastic.kernels.linear` with its default configuration (and, with --sweep, the best of a
grid of configurations), and the floor = weight bytes / the bandwidth of a large device-to-device copy. Every
call runs from a CUDA graph and rotates over enough weight copies that no call reads its weight from L2. The
kernel's result is checked against F.linear in fp32 (max abs error printed).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from moe_kernel import copy_bandwidth, load_kernels, submodule, time_graph  # noqa: E402
from shapes import SHAPES  # noqa: E402

L2_BYTES = 256 << 20  # rotate over copies totalling more than this (H100 L2: 50 MB)


def projections(shape: str) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of the linear layers a decode step of `shape` runs."""
    c = SHAPES[shape]
    h, d = c["hidden_size"], c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    experts = c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts")
    return {"qkv": (h, q + 2 * kv), "o_proj": (q, h), "router": (h, experts), "lm_head": (h, c["vocab_size"])}


def sweep_configs(rows: int) -> list[dict[str, int]]:
    block_m = max(16, 1 << (rows - 1).bit_length())
    return [{"BLOCK_M": block_m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s}
            for n, k, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4,), (3, 4, 5))]


def bench_case(lin, name: str, k: int, n: int, rows: int, bw: float, sweep: bool) -> dict:
    copies = max(2, -(-L2_BYTES // (k * n * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    torch_ms = time_graph([lambda w=w: F.linear(x, w) for w in weights])
    ours_ms = time_graph([lambda w=w: lin.linear(x, w) for w in weights])
    err = (lin.linear(x, weights[0]).float() - F.linear(x.float(), weights[0].float())).abs().max().item()
    row = dict(proj=name, in_features=k, out_features=n, rows=rows, torch_us=torch_ms * 1e3, ours_us=ours_ms * 1e3,
               floor_us=k * n * 2 / bw * 1e6, config=lin.skinny_config(rows, n, k), max_abs_err=err)
    if sweep:
        scored = []
        for cfg in sweep_configs(rows):
            try:
                scored.append((time_graph([lambda w=w: lin.linear(x, w, config=cfg) for w in weights], min_ms=5), cfg))
            except Exception:  # (out of shared memory)
                pass
        best_ms, best = min(scored, key=lambda r: r[0])
        row.update(best_us=best_ms * 1e3, best_config=best)
    del weights
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1,8,16,64")
    ap.add_argument("--sweep", action="store_true", help="also search a grid of launch configurations")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ek = load_kernels()
    lin = submodule(ek, "linear")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s; us per call", flush=True)
    print(f"{'proj':8s} {'rows':>4s} {'torch':>8s} {'ours':>8s} {'best':>8s} {'floor':>8s}  max err", flush=True)
    rows = []
    for name, (k, n) in projections(args.shape).items():
        for r in (int(v) for v in args.rows.split(",")):
            row = bench_case(lin, name, k, n, r, bw, args.sweep)
            rows.append(row)
            best = f"{row['best_us']:8.1f}" if "best_us" in row else f"{'-':>8s}"
            print(f"{name:8s} {r:4d} {row['torch_us']:8.1f} {row['ours_us']:8.1f} {best} {row['floor_us']:8.1f}  "
                  f"{row['max_abs_err']:.2e}" + (f"  {json.dumps(row['best_config'])}" if "best_config" in row else ""),
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), shape=args.shape,
                                            date=time.strftime("%Y-%m-%d %H:%M:%S"), copy_bandwidth_GBps=bw / 1e9,
                                            rows=rows), indent=1))


if __name__ == "__main__":
    main()
