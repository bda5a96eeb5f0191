"""EPLB placement policy: balancedness and slots moved per rebalance, ours vs DeepSeek's greedy vs none.

    python benchmarks/eplb_policy.py --out docs/results/eplb_policy.json --plot docs/eplb_policy.png

Each load type is a sequence of windows (per-layer expert popularity [L, E], Poisson token counts):
  zipf       fixed popularity 1/rank^1.0 (random expert order per layer), fresh counts per window;
  lognormal  fixed popularity exp(N(0, 1)), fresh counts per window;
  drift      lognormal popularity that evolves: x exp(N(0, 0.15)) per window, and per layer a 20% chance per
             window that a top-5 expert trades load with a random other one (hot-expert swap).
At each window every policy rebalances from its own previous placement (all start from the engine's initial
one: expert e in slot e, redundant slots round-robin). Reported: mean balancedness (vLLM's: mean GPU load /
max GPU load, averaged over layers) on the window the placement was computed from ("bal") and on the next
window ("next", what serving sees until the following rebalance); mean share of slots rewritten per rebalance,
first rebalance (from the initial placement) excluded. Policies: none (initial placement kept), greedy
(DeepSeek's published algorithm, elastic.eplb.reference), ours from scratch (current=None), ours with current.
S = E + E/8 rounded up to a multiple of the ranks.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elastic.eplb import balancedness, count_moved_slots, rebalance_experts, rebalance_experts_reference  # noqa: E402

TOKENS_PER_LAYER = 8192 * 8  # 8k tokens, top-8 routing
POLICIES = ("none", "greedy", "ours_scratch", "ours")


def popularity_sequence(kind: str, layers: int, experts: int, windows: int, rng: np.random.Generator):
    """Yield [L, E] expected load per window (sums to TOKENS_PER_LAYER per layer)."""
    if kind == "zipf":
        base = np.stack([(1.0 / np.arange(1, experts + 1))[rng.permutation(experts)] for _ in range(layers)])
    else:
        base = np.exp(rng.normal(0.0, 1.0, (layers, experts)))
    for _ in range(windows):
        yield base / base.sum(1, keepdims=True) * TOKENS_PER_LAYER
        if kind == "drift":
            base = base * np.exp(rng.normal(0.0, 0.15, base.shape))
            for layer in np.flatnonzero(rng.random(layers) < 0.2):
                hot = rng.choice(np.argsort(-base[layer])[:5])
                other = rng.integers(experts)
                base[layer, [hot, other]] = base[layer, [other, hot]]


def run_case(kind: str, experts: int, gpus: int, layers: int, windows: int, seed: int, groups: int = 1,
             nodes: int = 1) -> dict:
    slots = math.ceil((experts + experts // 8) / gpus) * gpus
    rng = np.random.default_rng(seed)
    loads = [torch.from_numpy(rng.poisson(p)).float() for p in popularity_sequence(kind, layers, experts,
                                                                                  windows + 1, rng)]
    initial = (torch.arange(slots) % experts).expand(layers, slots).clone()
    place = {p: initial for p in POLICIES}
    stats = {p: {"bal": [], "next": [], "moved": [], "seconds": []} for p in POLICIES}
    for w in range(windows):
        load, upcoming = loads[w], loads[w + 1]
        for policy in POLICIES:
            start = time.perf_counter()
            if policy == "greedy":
                new = rebalance_experts_reference(load, slots, groups, nodes, gpus)[0]
            elif policy == "ours_scratch":
                new = rebalance_experts(load, slots, groups, nodes, gpus)[0]
            elif policy == "ours":
                new = rebalance_experts(load, slots, groups, nodes, gpus, current=place[policy])[0]
            else:
                new = initial
            s = stats[policy]
            s["seconds"].append(time.perf_counter() - start)
            s["bal"].append(balancedness(load, new, gpus))
            s["next"].append(balancedness(upcoming, new, gpus))
            if w > 0:  # the first rebalance starts from the initial placement for everyone
                s["moved"].append(count_moved_slots(place[policy], new) / (layers * slots))
            place[policy] = new
    row = {"load": kind, "experts": experts, "gpus": gpus, "slots": slots, "groups": groups, "nodes": nodes,
           "layers": layers, "windows": windows}
    for policy, s in stats.items():
        row[policy] = {k: float(np.mean(v)) for k, v in s.items()}
    return row


def print_table(rows: list[dict]) -> None:
    head = (f"{'load':9} {'E':>4} {'G':>3} {'S':>4} {'N':>2} | {'bal none':>8} {'greedy':>7} {'scratch':>7} "
            f"{'ours':>7} | {'next grd':>8} {'ours':>7} | {'moved grd':>9} {'scratch':>7} {'ours':>6} "
            f"{'ratio':>6} | {'ours ms':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = r["ours"]["moved"] / max(r["greedy"]["moved"], 1e-12)
        print(f"{r['load']:9} {r['experts']:>4} {r['gpus']:>3} {r['slots']:>4} {r['nodes']:>2} | "
              f"{r['none']['bal']:8.4f} {r['greedy']['bal']:7.4f} {r['ours_scratch']['bal']:7.4f} "
              f"{r['ours']['bal']:7.4f} | {r['greedy']['next']:8.4f} {r['ours']['next']:7.4f} | "
              f"{r['greedy']['moved']:9.1%} {r['ours_scratch']['moved']:7.1%} {r['ours']['moved']:6.1%} "
              f"{ratio:6.3f} | {1e3 * r['ours']['seconds']:7.1f}")


def summary(rows: list[dict]) -> dict:
    """Goals: ours >= greedy (scratch always, with current on average); drift: moves <= 1/4, bal >= 98%."""
    out = {}
    for kind in sorted({r["load"] for r in rows}):
        sel = [r for r in rows if r["load"] == kind]
        out[kind] = {
            "cases": len(sel),
            "bal_none": float(np.mean([r["none"]["bal"] for r in sel])),
            "bal_greedy": float(np.mean([r["greedy"]["bal"] for r in sel])),
            "bal_ours_scratch": float(np.mean([r["ours_scratch"]["bal"] for r in sel])),
            "bal_ours": float(np.mean([r["ours"]["bal"] for r in sel])),
            "worst_bal_ours_over_greedy": float(min(r["ours"]["bal"] / r["greedy"]["bal"] for r in sel)),
            "worst_bal_scratch_over_greedy": float(min(r["ours_scratch"]["bal"] / r["greedy"]["bal"] for r in sel)),
            "moved_greedy": float(np.mean([r["greedy"]["moved"] for r in sel])),
            "moved_ours": float(np.mean([r["ours"]["moved"] for r in sel])),
            "worst_moved_ratio": float(max(r["ours"]["moved"] / r["greedy"]["moved"] for r in sel)),
        }
    return out


def timing(layers: int = 48) -> list[dict]:
    """Wall time of one rebalance at serving sizes, from scratch and with current (drifted load)."""
    out = []
    for experts, gpus in ((128, 8), (256, 32), (256, 64)):
        slots = math.ceil((experts + experts // 8) / gpus) * gpus
        loads = list(popularity_sequence("drift", layers, experts, 2, np.random.default_rng(1)))
        first = rebalance_experts(torch.from_numpy(loads[0]), slots, 1, 1, gpus)[0]
        t0 = time.perf_counter()
        rebalance_experts(torch.from_numpy(loads[1]), slots, 1, 1, gpus)
        t1 = time.perf_counter()
        rebalance_experts(torch.from_numpy(loads[1]), slots, 1, 1, gpus, current=first)
        t2 = time.perf_counter()
        rebalance_experts_reference(torch.from_numpy(loads[1]), slots, 1, 1, gpus)
        t3 = time.perf_counter()
        out.append({"layers": layers, "experts": experts, "gpus": gpus, "slots": slots,
                    "scratch_s": t1 - t0, "current_s": t2 - t1, "greedy_s": t3 - t2})
    return out


def plot(rows: list[dict], path: Path, experts: int = 256) -> None:
    """Top: 1 - balancedness (log, lower is better); bottom: % of slots rewritten per rebalance (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["zipf", "lognormal", "drift"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    styles = {"none": ("k", ":"), "greedy": ("tab:red", "--"), "ours_scratch": ("tab:green", "-."),
              "ours": ("tab:blue", "-")}
    for col, kind in enumerate(kinds):
        sel = [r for r in rows if r["load"] == kind and r["experts"] == experts and r["nodes"] == 1]
        gpus = [r["gpus"] for r in sel]
        for policy, (color, ls) in styles.items():
            label = {"ours_scratch": "ours, current=None", "ours": "ours, current given",
                     "greedy": "DeepSeek greedy"}.get(policy, policy)
            axes[0, col].plot(gpus, [1 - r[policy]["bal"] for r in sel], color=color, ls=ls, marker="o",
                              label=label)
            if policy != "none":
                axes[1, col].plot(gpus, [100 * r[policy]["moved"] for r in sel], color=color, ls=ls,
                                  marker="o", label=label)
        axes[0, col].set(yscale="log", title=f"{kind}: 1 - balancedness (E={experts})", ylabel="1 - mean/max")
        axes[1, col].set(yscale="log", ylim=(0.5, 150), title=f"{kind}: slots rewritten per rebalance",
                         ylabel="% of slots")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(gpus, [str(g) for g in gpus])
            ax.minorticks_off()
            ax.set_xlabel("ranks (GPUs)")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--experts", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    ap.add_argument("--loads", nargs="+", default=["zipf", "lognormal", "drift"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    rows = []
    for kind in args.loads:
        for experts in args.experts:
            for gpus in args.gpus:
                rows.append(run_case(kind, experts, gpus, args.layers, args.windows, seed=len(rows)))
        # Hierarchical: 8 expert groups (DeepSeek-V3 style), 8 GPUs per node.
        for gpus in (g for g in args.gpus if g >= 16 and 256 in args.experts):
            rows.append(run_case(kind, 256, gpus, args.layers, args.windows, seed=len(rows), groups=8,
                                 nodes=gpus // 8))
    print_table(rows)
    result = {"summary": summary(rows), "timing": timing(), "rows": rows,
              "host": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}}
    print(json.dumps({"summary": result["summary"], "timing": result["timing"]}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
