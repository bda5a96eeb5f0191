#!/usr/bin/env bash
# The skinny linear kernel (device machine, repo root; PYTHONPATH, elastic/kernels and NVLink multicast off set
# up by the caller; 2 GPUs for the DP=2 part). Parts (${OUT:-.}/lin_*): linear_kernel.py --sweep (ours against
# F.linear and the floor, the 30B shape's projections at 1-64 rows), then decode.py with the kernel on and off
# (ELASTIC_SKINNY_LINEAR=0): DP=1 at 1 and 64, DP=2 p2p at 1 and 64 per rank and a lone request.
#   bash benchmarks/gpu_linear.sh
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out"
PART_PREFIX=lin_
TAIL=${TAIL:-3}
source "$(dirname "$0")/parts.sh"
part bench 240 python3 benchmarks/linear_kernel.py --sweep --out "$out/lin_bench.json"
for on in 1 0; do
  ELASTIC_SKINNY_LINEAR=$on part "dp1_$on" 85 python3 benchmarks/decode.py --batch-sizes 1,64 --out "$out/lin_dp1_$on.json"
  ELASTIC_SKINNY_LINEAR=$on part "dp2_$on" 125 python3 benchmarks/decode.py --data-parallel-size 2 --ep-dispatch p2p \
      --batch-sizes 1,64 --lone-batch-sizes 1 --out "$out/lin_dp2_$on.json"
done
echo
echo "== skinny linear ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
grep -vE "^\s*$|Warning|warn" "$out/lin_bench.log" | head -24
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("dp1_1", "dp1_0", "dp2_1", "dp2_0"):
    try:
        d = json.loads((out / f"lin_{name}.json").read_text())
    except Exception:
        continue
    print(f"{name}:", ", ".join(f"b{r['batch']}{' lone' if r.get('lone') else ''} {r['step_ms']:.2f} ms "
                               f"({r['ratio']:.3f}x floor)" for r in d["rows"]))
PY
