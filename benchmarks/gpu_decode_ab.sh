#!/usr/bin/env bash
# Session 11's launch changes on and off in one call (device machine, repo root; PYTHONPATH, elastic/kernels
# and NVLink multicast off set up by the caller; 2 GPUs): programmatic dependent launch and the skinny linear
# kernel (ELASTIC_PDL=0 ELASTIC_SKINNY_LINEAR=0: the launches of before). Parts (${OUT:-.}/ab_*):
#   linear_kernel.py (no sweep); decode.py DP=1 at 1 and 64, DP=2 p2p at 1 and 64 per rank and a lone request,
#   new then old; gpu_check_dp.py (fp32 DP=2 = one GPU, bf16 agreement); gpu_check_engine.py (every family on
#   the GPU against the CPU's fp32, tiny checkpoints).
#   bash benchmarks/gpu_decode_ab.sh
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out"
PART_PREFIX=ab_
TAIL=${TAIL:-3}
source "$(dirname "$0")/parts.sh"
part linear 90 python3 benchmarks/linear_kernel.py --out "$out/ab_linear.json"
for arm in new old; do
  if [ $arm = new ]; then export ELASTIC_PDL=1 ELASTIC_SKINNY_LINEAR=1; else export ELASTIC_PDL=0 ELASTIC_SKINNY_LINEAR=0; fi
  part "dp1_$arm" 85 python3 benchmarks/decode.py --batch-sizes 1,64 --out "$out/ab_dp1_$arm.json"
  part "dp2_$arm" 125 python3 benchmarks/decode.py --data-parallel-size 2 --ep-dispatch p2p --batch-sizes 1,64 \
      --lone-batch-sizes 1 --out "$out/ab_dp2_$arm.json"
done
export ELASTIC_PDL=1 ELASTIC_SKINNY_LINEAR=1
part check_dp 150 python3 benchmarks/gpu_check_dp.py --world 2 --skip-30b --families qwen3_moe --modes p2p \
    --out "$out/ab_check_dp.json"
part engine 200 python3 benchmarks/gpu_check_engine.py --skip-30b --out "$out/ab_engine.json"
echo
echo "== launch changes new / old ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
grep -vE "^\s*$|Warning|warn" "$out/ab_linear.log" | head -20
tail -4 "$out/ab_check_dp.log"
grep -iE "pass|fail|ok|identical" "$out/ab_engine.log" | tail -8
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("dp1_new", "dp1_old", "dp2_new", "dp2_old"):
    try:
        d = json.loads((out / f"ab_{name}.json").read_text())
    except Exception:
        continue
    print(f"{name}:", ", ".join(f"b{r['batch']}{' lone' if r.get('lone') else ''} {r['step_ms']:.2f} ms "
                               f"({r['ratio']:.3f}x floor)" for r in d["rows"]))
PY
