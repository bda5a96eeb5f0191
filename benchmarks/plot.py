"""Plot kernel and decode results as ratios to the memory floor (PNG for docs/).

    python benchmarks/plot.py --moe moe.json --decode decode.json --out docs/performance.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", type=Path, required=True, help="JSON from benchmarks/moe_kernel.py --out")
    ap.add_argument("--decode", type=Path, nargs="+", required=True, help="JSON from benchmarks/decode.py --out")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    moe = json.loads(args.moe.read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for shape in sorted({r["shape"] for r in moe["rows"]}):
        rows = [r for r in moe["rows"] if r["shape"] == shape]
        tokens = [r["tokens"] for r in rows]
        line, = left.plot(tokens, [r["ours_ms"] / r["floor_ms"] for r in rows], marker="o", label=f"{shape}: ours")
        gmm = [(r["tokens"], r["grouped_mm_ms"] / r["floor_ms"]) for r in rows if r.get("grouped_mm_ms")]
        if gmm:
            left.plot(*zip(*gmm), ls="--", color=line.get_color(), alpha=0.6, label=f"{shape}: torch._grouped_mm")
    left.axhline(1.0, color="k", lw=0.8)
    left.axhline(1 / 0.85, color="k", lw=0.8, ls=":", label="85% of floor")
    left.set(xscale="log", yscale="log", xlabel="tokens", ylabel="time / HBM floor",
             title=f"MoE layer ({moe.get('gpu', moe.get('device', ''))})")
    left.legend(fontsize=7)
    for path in args.decode:
        dec = json.loads(path.read_text())
        label = f"{dec['shape']}: {path.stem}"
        right.plot([r["batch"] for r in dec["rows"]], [r["ratio"] for r in dec["rows"]], marker="o", label=label)
    right.axhline(1.0, color="k", lw=0.8)
    right.axhline(1.25, color="k", lw=0.8, ls=":", label="target 1.25x")
    right.set(xscale="log", xlabel="batch (1k context)", ylabel="step time / memory floor",
              title=f"Decode step ({dec['gpu']})")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
