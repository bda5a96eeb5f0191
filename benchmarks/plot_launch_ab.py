"""Plot decode step times with a change on and off, one GPU and two, from gpu_decode_ab.sh's decode.py JSONs, and
serving output throughput of one GPU against two by concurrency (gpu_serve.sh's serve.py JSONs), PNG for docs/.

    python benchmarks/plot_launch_ab.py --ab docs/results/launch_2026-11-26/6_ab_checks_h100 \
        --serving docs/results/launch_2026-11-26/7_serving_h100 --out docs/launch-ab.png

Left: median decode step (ms) by case, old launches (ELASTIC_PDL=0 ELASTIC_SKINNY_LINEAR=0) against new, each
bar labelled with its multiple of the memory floor. Right: output tok/s at c = 1, 16, 64, 128, DP=1 against DP=2.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def step_rows(directory: Path, arm: str) -> dict[str, dict]:
    rows = {}
    for dp in ("dp1", "dp2"):
        data = json.loads((directory / f"ab_{dp}_{arm}.json").read_text())
        for r in data["rows"]:
            label = f"{dp.upper()} {'lone 1' if r.get('lone') else r['batch']}"
            rows[label] = r
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ab", type=Path, required=True)
    ap.add_argument("--serving", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    old, new = step_rows(args.ab, "old"), step_rows(args.ab, "new")
    labels = list(new)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    for i, (arm, rows, color) in enumerate((("before", old, "#bbbbbb"), ("PDL + skinny linear", new, "#3b7dd8"))):
        xs = [j + (i - 0.5) * width for j in range(len(labels))]
        bars = left.bar(xs, [rows[k]["step_ms"] for k in labels], width, label=arm, color=color)
        for bar, k in zip(bars, labels):
            left.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{rows[k]['ratio']:.2f}x",
                      ha="center", va="bottom", fontsize=7)
    left.set_xticks(range(len(labels)), [k.replace("DP", "DP=") for k in labels], fontsize=8)
    left.set_ylabel("decode step, ms (label: x memory floor)")
    left.set_title("decode.py, Qwen3-30B-A3B shape (batch per rank)")
    left.legend(fontsize=8)
    concs = [1, 16, 64, 128]
    for dp, color in (("dp1", "#bbbbbb"), ("dp2", "#3b7dd8")):
        tput = [json.loads((args.serving / f"{dp}_c{c}.json").read_text())["output_throughput"] for c in concs]
        right.plot(concs, tput, marker="o", color=color, label=f"DP={dp[-1]}")
        for c, t in zip(concs, tput):
            right.annotate(f"{t:.0f}", (c, t), textcoords="offset points", xytext=(0, 6 if dp == "dp2" else -12),
                           ha="center", fontsize=7)  # (one GPU's labels below its points: c=1 is close)
    right.set_xscale("log", base=2)
    right.set_xticks(concs, [str(c) for c in concs])
    right.set_xlabel("concurrent requests (1 024 in / 128 out)")
    right.set_ylabel("output tok/s")
    right.set_title("serving, one GPU against two")
    right.legend(fontsize=8)
    fig.suptitle(f"2 x {json.loads((args.ab / 'ab_dp1_new.json').read_text())['gpu']}, 2026-11-26", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
