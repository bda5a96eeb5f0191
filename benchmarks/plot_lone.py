"""Plot where a lone request's decode step spends its GPU time, one GPU against two before and after a change
(profile_dp_step.py's kernel timelines), and serving output throughput of one GPU against two by concurrency
(gpu_serve.sh's serve.py JSONs), PNG for docs/.

    python benchmarks/plot_lone.py \
        --profile "one GPU=docs/results/ll_2026-11-26/1_profile_lone_h100/lone_dp1.log" \
        --profile "two GPUs, before=docs/results/ll_2026-11-26/1_profile_lone_h100/lone_dp2.log" \
        --profile "two GPUs, after=docs/results/ll_2026-11-26/4_ll_ab_h100/fold_profile.log" \
        --serving docs/results/ll_2026-11-26/5_lone_serve_h100 --out docs/lone-request.png

Left: per step, the kernels of the MoE layers by role (routing, exchange, alignment, experts, sum) stacked under
everything else; each kernel's share counted from the end of the kernel before it. Right: output tok/s at
c = 1, 16, 64, 128, DP=1 against DP=2, with the c=1 ratio written over it.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Kernel name -> role in a MoE layer; anything else is "the rest of the step".
ROLES = {"_route_to_slots_kernel": "routing", "_moe_align_one_cta_kernel": "alignment", "_moe_up_kernel": "experts",
         "_moe_down_kernel": "experts", "_moe_sum_kernel": "sum", "p2p_dispatch_kernel": "exchange",
         "p2p_combine_push_kernel": "exchange", "p2p_combine_reduce_kernel": "exchange",
         "p2p_ll_dispatch_kernel": "exchange", "p2p_ll_push_kernel": "exchange"}
ORDER = ["rest of the step", "routing", "alignment", "experts", "sum", "exchange"]
_LINE = re.compile(r"^\s+([\d.]+) us\s+([\d.]+) calls\s+([\d.]+) us/call\s+(\S+)")


def timeline(path: Path) -> dict[str, float]:
    """The last kernel timeline of a profile_dp_step.py log -> ms per step by role."""
    text = path.read_text().split("kernel timeline, per step:")[-1]
    total = float(text.split("us", 1)[0])
    roles = dict.fromkeys(ORDER, 0.0)
    for line in text.splitlines()[1:]:
        m = _LINE.match(line)
        if not m:
            break
        roles[ROLES.get(m.group(4), "rest of the step")] += float(m.group(1)) / 1e3
    listed = sum(roles.values())
    roles["rest of the step"] += total / 1e3 - listed  # gaps and the kernels past the listed 25
    return roles


def serving(directory: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for tag in ("dp1", "dp2"):
        for f in directory.glob(f"{tag}_c*.json"):
            conc = int(f.stem.split("_c")[1])
            if conc <= 128:
                out.setdefault(tag, {})[conc] = json.loads(f.read_text())["output_throughput"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", action="append", required=True, help="LABEL=path of a profile_dp_step.py log")
    ap.add_argument("--serving", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    profiles = [(label, timeline(Path(path))) for label, path in (p.split("=", 1) for p in args.profile)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(ORDER, ["#cccccc", "#8da0cb", "#a6d854", "#66c2a5", "#ffd92f", "#fc8d62"]))
    for x, (label, roles) in enumerate(profiles):
        bottom = 0.0
        for role in ORDER:
            name = "exchange (its kernels also route and align, now)" if role == "exchange" else role
            left.bar(x, roles[role], bottom=bottom, color=colors[role], label=name if x == 0 else None)
            bottom += roles[role]
        left.text(x, bottom + 0.03, f"{bottom:.2f} ms", ha="center", fontsize=9)
    left.set_xticks(range(len(profiles)), [label for label, _ in profiles], fontsize=9)
    left.set_ylabel("GPU time per decode step, ms (profiled)")
    left.set_title("A lone request's step, Qwen3-30B-A3B shape, 2 x H100")
    left.legend(fontsize=8, loc="lower right")
    tput = serving(args.serving)
    concs = sorted(tput.get("dp1", {}))
    width = 0.38
    for i, tag in enumerate(("dp1", "dp2")):
        right.bar([j + (i - 0.5) * width for j in range(len(concs))], [tput[tag][c] for c in concs], width,
                  label={"dp1": "DP=1 (one GPU)", "dp2": "DP=2 (two GPUs, p2p)"}[tag])
    if 1 in concs:
        ratio = tput["dp2"][1] / tput["dp1"][1]
        right.text(0, max(tput["dp2"][1], tput["dp1"][1]) + 150, f"c=1: {ratio:.2f}x", ha="center", fontsize=9)
    right.set_xticks(range(len(concs)), [f"c={c}" for c in concs])
    right.set_ylabel("output tok/s")
    right.set_title("Serving, 1024 in / 128 out")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
