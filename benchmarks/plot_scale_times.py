"""Plot how long each scale took, run beside run, against the targets (PNG for docs/).

    python benchmarks/plot_scale_times.py --run "before" a.json b.json --run "standby engines" c.json d.json \
        --out docs/scaling-times.png

Each --run: a label, then JSON files of benchmarks/scale.py (their "scales": every POST /scale and its reply).
One group of bars per transition and starting size (1 -> 2 started at 1, ...), one bar per run: the total, its blocking window
marked at the bottom.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGETS = {"up": 10.0, "down": 2.0}  # seconds (issue #12)


def transitions(paths: list[str]) -> dict[str, dict]:
    """'1 -> 2 (from 1)' -> the reply of that scale, by the size the server started at (the same files of
    each run, so the same situations side by side)."""
    found: dict[str, dict] = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        for scale in result["scales"]:
            reply = scale["reply"]
            found.setdefault(f"{reply['from']} -> {reply['to']}\n(started at {result['initial_size']})", reply)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs="+", action="append", required=True, metavar=("LABEL", "JSON"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="POST /scale under load: total time per transition")
    args = ap.parse_args()
    runs = [(run[0], transitions(run[1:])) for run in args.run]
    names = sorted({name for _, found in runs for name in found}, key=lambda n: (n.split("\n")[1], n))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(runs)
    for i, (label, found) in enumerate(runs):
        xs = [j + i * width for j, name in enumerate(names) if name in found]
        totals = [found[name]["total_s"] for name in names if name in found]
        bars = ax.bar(xs, totals, width, label=label)
        ax.bar(xs, [found[name]["blocking_s"] for name in names if name in found], width, color="black")
        ax.bar_label(bars, fmt="%.1f s", fontsize=8)
    for j, name in enumerate(names):
        source, target = name.split("\n")[0].split(" -> ")
        direction = "up" if int(source) < int(target) else "down"
        ax.hlines(TARGETS[direction], j - width / 2, j + 0.8 - width / 2, colors="gray", linestyles="--",
                  label="target (up <= 10 s, down <= 2 s)" if j == 0 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set_ylabel("seconds (black: blocking window)")
    ax.set_title(args.title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
