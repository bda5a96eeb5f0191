#!/usr/bin/env bash
# Serving, one GPU against two (DP=2, expert-parallel p2p), same machine, same prompts, Qwen3-30B-A3B-shaped
# dummy model, 1024 in / 128 out. Per server: the fresh server's first c=16 burst, then c = 16/1/64/128, then
# Poisson arrivals at ${RATE:-8} requests per second per rank (DP=1: RATE, DP=2: 2 x RATE: equal load per rank).
# Step traces of both servers (STEP_TRACE=1, benchmarks/gpu_serve.sh), summarized for the rate run.
#   bash benchmarks/gpu_serve_ep.sh     # results: ${OUT:-.}/dp1_*.json, dp2_*.json; a table last
set -uo pipefail
rate=${RATE:-8}
export STEP_TRACE=1
TAG=dp1 BURST=1 CONCS="16 1 64 128" RATES="$rate" bash benchmarks/gpu_serve.sh "$@" > /dev/null
TAG=dp2 BURST=1 CONCS="16 1 64 128" RATES="$((2 * rate))" bash benchmarks/gpu_serve.sh --data-parallel-size 2 "$@" \
    > /dev/null
for tag in dp1 dp2; do
  python3 benchmarks/step_trace_report.py --last-run "${OUT:-.}/${tag}_trace"
done
python3 - "${OUT:-.}" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'setup':<6} {'run':>6} {'out tok/s':>10} {'TTFT ms':>8} {'TTFT p99':>9} {'TPOT ms':>8} {'failed':>6}")
for tag in ("dp1", "dp2"):
    for name in ("burst", "c16", "c1", "c64", "c128") + tuple(f.stem.split("_")[1] for f in out.glob(f"{tag}_r*.json")):
        f = out / f"{tag}_{name}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        print(f"{tag:<6} {name:>6} {r['output_throughput']:10.0f} {r['mean_ttft_ms']:8.1f} {r['p99_ttft_ms']:9.1f} "
              f"{r['mean_tpot_ms']:8.2f} {r['failed']:>6}")
PY
