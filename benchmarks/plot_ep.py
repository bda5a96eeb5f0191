"""Plot the expert-parallel results: dispatch + combine per MoE layer by path, and serving throughput of one
GPU against two by concurrency (PNG for docs/).

    python benchmarks/plot_ep.py --comm ep_comm.json [ep_comm4.json] --serving serving_summary.json --out docs/ep-p2p.png

--comm: JSON from benchmarks/ep_comm.py; --serving: {"rows": [{setup: dp1|dp2, max_concurrency, output_throughput}]},
the table gpu_serve_dp.sh prints last.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PATHS = {"alltoall_us": "all-to-all (eager)", "allgather_graph_us": "all-gather (graph)", "p2p_graph_us": "p2p (graph)"}


def plot_comm(ax: plt.Axes, reports: list[dict]) -> None:
    for report in reports:
        tokens = [r["tokens_per_rank"] for r in report["rows"]]
        for key, label in PATHS.items():
            ax.plot(tokens, [r[key] for r in report["rows"]], marker="o",
                    linestyle="-" if report["world"] == 2 else "--", label=f"{label}, {report['world']} GPUs")
    ax.axhline(50, color="gray", linewidth=0.8)
    ax.text(1, 52, "issue #10 target at 128 tokens (2 GPUs)", fontsize=8, color="gray")
    ax.set(xscale="log", yscale="log", xlabel="tokens per rank", ylabel="µs per MoE layer (dispatch + combine)",
           title=f"Expert-parallel exchange, {reports[0]['gpu']}")
    ax.legend(fontsize=7)


def plot_serving(ax: plt.Axes, summary: dict) -> None:
    for tag, label in (("dp1", "DP=1 (one GPU)"), ("dp2", "DP=2, p2p")):
        rows = sorted((r for r in summary["rows"] if r["setup"] == tag), key=lambda r: r["max_concurrency"])
        ax.plot([r["max_concurrency"] for r in rows], [r["output_throughput"] for r in rows], marker="o", label=label)
    ax.set(xscale="log", xlabel="concurrent streaming clients (1024 in / 128 out)", ylabel="output tokens/s",
           title="Serving, Qwen3-30B-A3B-shaped model")
    ax.legend()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comm", type=Path, nargs="+", required=True)
    ap.add_argument("--serving", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    plot_comm(left, [json.loads(p.read_text()) for p in args.comm])
    plot_serving(right, json.loads(args.serving.read_text()))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
