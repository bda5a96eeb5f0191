#!/usr/bin/env bash
# Serving, one GPU against two (DP=2, expert-parallel), same machine, same prompts: Qwen3-30B-A3B-shaped
# dummy model, 1024 in / 128 out, concurrency 1/16/64/128 (DP=2 also at 256 = 128 per rank).
#   bash benchmarks/gpu_serve_dp.sh [extra serve args]   # results: ${OUT:-.}/dp1_c*.json, dp2_c*.json
set -uo pipefail
TAG=dp1 CONCS="1 16 64 128" bash benchmarks/gpu_serve.sh "$@" | grep -E "Output token throughput|Mean TTFT|Mean TPOT|Failed|Successful"
TAG=dp2 CONCS="1 16 64 128 256" bash benchmarks/gpu_serve.sh --data-parallel-size 2 "$@" \
    | grep -E "Output token throughput|Mean TTFT|Mean TPOT|Failed|Successful"
python3 - "${OUT:-.}" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'setup':<6} {'conc':>5} {'out tok/s':>10} {'TTFT ms':>8} {'TPOT ms':>8} {'failed':>6}")
for tag in ("dp1", "dp2"):
    for f in sorted(out.glob(f"{tag}_c*.json"), key=lambda p: int(p.stem.split("_c")[1])):
        r = json.loads(f.read_text())
        g = lambda *ks: next((r[k] for k in ks if k in r), float("nan"))
        print(f"{tag:<6} {f.stem.split('_c')[1]:>5} {g('output_throughput'):10.0f} {g('mean_ttft_ms'):8.1f} "
              f"{g('mean_tpot_ms'):8.2f} {g('failed', 'num_failed'):>6}")
PY
