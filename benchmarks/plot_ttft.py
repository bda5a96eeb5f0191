"""Plot time to first token at equal load per rank, one GPU against two, for runs of gpu_ttft.sh /
gpu_serve_ep.sh (the rate runs' serve.py JSONs and the engines' step traces), PNG for docs/.

    python benchmarks/plot_ttft.py --run "eager=DIR1:ttft_dp1_r8.json:ttft_dp2_r16.json:ttft_dp2_trace" \
        --run "graphs=DIR2:dp1_r8.json:dp2_r16.json:dp2_trace" --out docs/ttft-dp.png

Left: mean, median and p99 TTFT of DP=1 and DP=2 per run. Right: DP=2 rank 0's median step by kind of step
(benchmarks/step_trace_report.py) per run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_trace_report  # noqa: E402

KINDS = ("decode graph", "prefill", "decode beside prefill")


def load_run(spec: str) -> tuple[str, dict, dict, dict]:
    label, rest = spec.split("=", 1)
    directory, dp1, dp2, trace = rest.split(":")
    root = Path(directory)
    steps = step_trace_report.last_run(step_trace_report.load(root / trace)[0], 1.0)
    by_kind = {row[0].replace(" (eager)", ""): row[3] for row in step_trace_report.summarize(steps, 1.0)}
    return label, json.loads((root / dp1).read_text()), json.loads((root / dp2).read_text()), by_kind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="LABEL=DIR:DP1_JSON:DP2_JSON:DP2_TRACE_DIR")
    ap.add_argument("--title", default="2 x H100, Qwen3-30B-A3B-shaped, 1024 in / 128 out, 8 requests/s per rank")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    runs = [load_run(spec) for spec in args.run]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    stats = (("mean_ttft_ms", "mean"), ("median_ttft_ms", "median"), ("p99_ttft_ms", "p99"))
    groups = [(f"{label}\nDP={dp}", report) for label, dp1, dp2, _ in runs for dp, report in ((1, dp1), (2, dp2))]
    width = 0.8 / len(stats)
    for i, (key, name) in enumerate(stats):
        bars = left.bar([g + (i - 1) * width for g in range(len(groups))], [r[key] for _, r in groups], width, label=name)
        left.bar_label(bars, fmt="%.0f", fontsize=7)
    left.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=8)
    left.set(ylabel="time to first token, ms", title="TTFT at equal load per rank")
    left.legend(fontsize=8)
    width = 0.8 / len(runs)
    for i, (label, _, _, by_kind) in enumerate(runs):
        bars = right.bar([k + (i - (len(runs) - 1) / 2) * width for k in range(len(KINDS))],
                         [by_kind.get(k, 0.0) for k in KINDS], width, label=label)
        right.bar_label(bars, fmt="%.1f", fontsize=7)
    right.set_xticks(range(len(KINDS)), KINDS)
    right.set(ylabel="median step, ms (DP=2, rank 0)", title="DP=2 steps by kind (step traces)")
    right.legend(fontsize=8)
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
