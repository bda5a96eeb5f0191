#!/usr/bin/env bash
# A lone request's fused-MoE configuration under DP=2 (2 GPUs; device machine, repo root; PYTHONPATH, elastic/kernels
# and NVLink multicast off set up by the caller): decode.py DP=2 at 1 per rank and a lone request, then
# tune_lone.py (writes kernels/configs/E=64,N=768,...: copied to ${OUT:-.}), then decode.py again; DP=1 at 1 beside.
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out"
PART_PREFIX=lone_
TAIL=${TAIL:-2}
source "$(dirname "$0")/parts.sh"
dp2=(python3 benchmarks/decode.py --data-parallel-size 2 --ep-dispatch p2p --batch-sizes 1 --lone-batch-sizes 1)
part before 70 "${dp2[@]}" --out "$out/lone_before.json"
part tune 90 python3 benchmarks/tune_lone.py --tune-dir kernels/configs --out "$out/lone_tune.json"
cp kernels/configs/E=64,N=768,* "$out/" 2>/dev/null
part after 60 "${dp2[@]}" --out "$out/lone_after.json"
part dp1 40 python3 benchmarks/decode.py --batch-sizes 1 --out "$out/lone_dp1.json"
printf '%s\n' "${status[@]}"
grep -E "heuristic|chosen" "$out/lone_tune.log"
for f in before after dp1; do python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], ', '.join(f\"b{r['batch']}{' lone' if r.get('lone') else ''} {r['step_ms']:.3f} ms\" for r in d['rows']))" "$out/lone_$f.json" $f; done
