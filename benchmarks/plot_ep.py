"""Plot the expert-parallel results: dispatch + combine per MoE layer by path, and serving throughput of one
GPU against two by concurrency (PNG for docs/).

    python benchmarks/plot_ep.py --comm ep_comm.json [ep_comm4.json] --serving serving_summary.json --out docs/ep-p2p.png
    python benchmarks/plot_ep.py --barrier LABEL=ep_comm.json [LABEL=...] --out docs/ep-barrier.png

--comm: JSON from benchmarks/ep_comm.py; --serving: {"rows": [{setup: dp1|dp2, max_concurrency, output_throughput}]},
the table gpu_serve_dp.sh prints last. --barrier: ep_comm.py JSONs of one machine, one per variant of the p2p
barrier: the exchange per layer from a CUDA graph, with and without its barriers, by tokens per rank.
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


def plot_barrier(ax: plt.Axes, variants: list[tuple[str, dict]]) -> None:
    tokens = [r["tokens_per_rank"] for r in variants[0][1]["rows"]]
    width = 0.8 / len(variants)
    for i, (label, report) in enumerate(variants):
        x = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(tokens))]
        rows = report["rows"]
        bars = ax.bar(x, [r["p2p_graph_us"] for r in rows], width, label=label)
        ax.scatter(x, [r["p2p_no_barrier_graph_us"] for r in rows], marker="_", s=200, color="black",
                   zorder=3, label="the same kernels without barriers" if i == 0 else None)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(tokens)), [str(t) for t in tokens])
    ax.set_ylim(0, 1.45 * max(r["p2p_graph_us"] for _, report in variants for r in report["rows"]))
    ax.set(xlabel="tokens per rank", ylabel="µs per MoE layer (dispatch + push + reduce, CUDA graph)",
           title=f"p2p exchange barrier, {variants[0][1]['gpu']} x{variants[0][1]['world']}")
    ax.legend(fontsize=7, loc="upper left", ncol=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comm", type=Path, nargs="+")
    ap.add_argument("--serving", type=Path)
    ap.add_argument("--barrier", nargs="+", help="LABEL=ep_comm.json per barrier variant")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.barrier:
        fig, ax = plt.subplots(figsize=(8, 4.8))
        plot_barrier(ax, [(v.split("=", 1)[0], json.loads(Path(v.split("=", 1)[1]).read_text())) for v in args.barrier])
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        return
    if not args.comm or not args.serving:
        ap.error("--comm and --serving (or --barrier)")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    plot_comm(left, [json.loads(p.read_text()) for p in args.comm])
    plot_serving(right, json.loads(args.serving.read_text()))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
