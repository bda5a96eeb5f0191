"""Summarize the step traces of a server run (ELASTIC_STEP_TRACE=DIR, see elastic/engine/step_trace.py): per
rank, how many steps of each kind it ran, how long they took (the time to its next step), and their share of
the traced time.

    ELASTIC_STEP_TRACE=/tmp/steps elastic serve ... ; python benchmarks/step_trace_report.py /tmp/steps

Kinds: "prefill" (this rank's tokens include a prompt chunk), "decode beside prefill" (this rank decodes
while another rank prefills: a mixed-step graph), "idle beside prefill", "decode graph" (a decode graph's
replay; on one rank: a decode step of at most 512 tokens), "idle graph"; "(eager)": a data-parallel step
that no graph fits (on one rank the engine picks a graph itself, which the trace does not record). A gap over --idle-s seconds
between two steps is idle time, not a step; --last-run keeps only the steps after the last such gap (a
benchmark's last run, after warm-ups).
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def kind(step: dict) -> str:
    eager = " (eager)" if step["dp"] is not None and step["graph"] is None else ""
    if not step["decode"]:
        return "prefill" + eager
    who = "idle" if step["tokens"] == 0 else "decode"
    if step.get("mixed") or eager:
        return f"{who} beside prefill{eager}"
    return f"{who} graph" if step["graph"] is not None or step["tokens"] <= 512 else f"{who} (eager)"


def load(directory: Path) -> dict[int, list[dict]]:
    by_rank: dict[int, list[dict]] = defaultdict(list)
    for path in directory.glob("steps-*.jsonl"):
        for line in path.read_text().splitlines():
            step = json.loads(line)
            by_rank[step["rank"]].append(step)
    return {rank: sorted(steps, key=lambda s: s["t"]) for rank, steps in sorted(by_rank.items())}


def last_run(steps: list[dict], idle_s: float) -> list[dict]:
    start = max((i + 1 for i, (a, b) in enumerate(zip(steps, steps[1:])) if b["t"] - a["t"] > idle_s), default=0)
    return steps[start:]


def summarize(steps: list[dict], idle_s: float) -> list[tuple[str, int, float, float, float, float, float]]:
    """-> (kind, count, total s, median ms, p90 ms, max ms, mean tokens) per kind."""
    periods: dict[str, list[float]] = defaultdict(list)
    tokens: dict[str, list[int]] = defaultdict(list)
    for step, nxt in zip(steps, steps[1:]):
        dt = nxt["t"] - step["t"]
        if dt > idle_s:
            continue
        periods[kind(step)].append(dt)
        tokens[kind(step)].append(step["tokens"])
    rows = []
    for name, dts in sorted(periods.items(), key=lambda kv: -sum(kv[1])):
        dts.sort()
        rows.append((name, len(dts), sum(dts), statistics.median(dts) * 1e3, dts[len(dts) * 9 // 10] * 1e3,
                     dts[-1] * 1e3, statistics.mean(tokens[name])))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory", type=Path)
    ap.add_argument("--idle-s", type=float, default=1.0)
    ap.add_argument("--last-run", action="store_true")
    args = ap.parse_args()
    for rank, steps in load(args.directory).items():
        if args.last_run:
            steps = last_run(steps, args.idle_s)
        rows = summarize(steps, args.idle_s)
        traced = sum(r[2] for r in rows)
        print(f"rank {rank}: {len(steps)} steps, {traced:.2f} s traced")
        print(f"  {'kind':<30} {'steps':>6} {'share':>6} {'median ms':>10} {'p90 ms':>8} {'max ms':>8} {'tokens':>7}")
        for name, count, total, median, p90, longest, mean_tokens in rows:
            print(f"  {name:<30} {count:>6} {total / traced:6.1%} {median:10.2f} {p90:8.2f} {longest:8.2f} "
                  f"{mean_tokens:7.0f}")


if __name__ == "__main__":
    main()
