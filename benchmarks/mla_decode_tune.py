"""MLA decode kernel configurations against the latent cache's bandwidth (one GPU).

    python benchmarks/mla_decode_tune.py --out mla_tune.json

For DeepSeek-V2-Lite's dims (16 heads, latent 512 + rope 64) at batch 1, 16 and 64 with a 1 024-token
context, each variant of kernels/mla.py's DECODE_CFG (tile length, warps, stages, waves of programs) is
captured in a CUDA graph and timed; `max_seq_len` is the bound a decode graph is captured with (the model's
context length), which sets how many splits the grid has. Prints µs, latent GB/s and the error against the
torch reference; the fastest variant per batch, and over all batches, goes to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from gpu_check_deepseek import _inputs  # noqa: E402
from moe_kernel import time_graph  # noqa: E402

from elastic.kernels import mla, mla_attention, mla_attention_reference  # noqa: E402

VARIANTS = [dict(BLOCK_N=n, num_warps=w, num_stages=s, waves=v)
            for n, w, s, v in itertools.product((32, 64), (4, 8), (2, 3), (2, 4))]


def graph_us(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """`fn` replayed from a CUDA graph (moe_kernel.time_graph) -> (µs per call, its output)."""
    out = fn().float().clone()  # also compiles before the capture
    return time_graph([fn]) * 1e3, out


def time_variant(args: tuple, cfg: dict) -> tuple[float, torch.Tensor]:
    """One configuration of DECODE_CFG: mla_attention(*args) from a CUDA graph -> (µs per replay, output)."""
    saved = dict(mla.DECODE_CFG)
    mla.DECODE_CFG.update(cfg)
    try:
        return graph_us(lambda: mla_attention(*args))
    finally:
        mla.DECODE_CFG.clear()
        mla.DECODE_CFG.update(saved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--max-seq-len", type=int, default=4096, help="the bound the decode graphs are captured with")
    ap.add_argument("--current-only", action="store_true", help="time the current DECODE_CFG only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    H, C, R = 16, 512, 64
    rows, total = [], {}
    print(f"{torch.cuda.get_device_name()}, context {args.context}, graphs sized for {args.max_seq_len}")
    print(f"{'batch':>5} {'BLOCK_N':>7} {'warps':>5} {'stages':>6} {'waves':>5} {'us':>8} {'GB/s':>7} {'rel err':>8}")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        q_lat, q_pe, cache, tables, qsl, seq_lens = _inputs(batch, args.context, 1, H, C, R)
        call = (q_lat, q_pe, cache, tables, qsl, seq_lens, 192 ** -0.5, 1, args.max_seq_len)
        ref = mla_attention_reference(*call[:-1], args.context).float()
        for cfg in [dict(mla.DECODE_CFG)] + ([] if args.current_only else VARIANTS):
            us, out = time_variant(call, cfg)
            err = float((out - ref).norm() / ref.norm())
            gbs = batch * args.context * (C + R) * 2 / (us * 1e-6) / 1e9
            row = dict(batch=batch, us=us, latent_gbs=gbs, rel_err=err, **{k: cfg[k] for k in VARIANTS[0]})
            rows.append(row)
            key = tuple(cfg[k] for k in VARIANTS[0])
            total[key] = total.get(key, 0.0) + us
            print(f"{batch:5d} {cfg['BLOCK_N']:7d} {cfg['num_warps']:5d} {cfg['num_stages']:6d} {cfg['waves']:5d} "
                  f"{us:8.1f} {gbs:7.0f} {err:8.1e}", flush=True)
    best = dict(zip(VARIANTS[0], min(total, key=total.get)))
    print(f"fastest over all batches: {best} (the current DECODE_CFG: {dict(mla.DECODE_CFG)})")
    if args.out:
        args.out.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), context=args.context,
                                            max_seq_len=args.max_seq_len, best=best, rows=rows), indent=1))


if __name__ == "__main__":
    main()
