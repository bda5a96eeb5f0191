#!/usr/bin/env bash
# A lone request and serving, one GPU against two, in one call (device machine, repo root; PYTHONPATH,
# elastic/kernels and NVLink multicast off set up by the caller; 2 GPUs). Parts (${OUT:-.}/ls_*, serving's
# dp1_c*.json / dp2_c*.json): decode.py DP=1 at 1 and 64, DP=2 p2p at 1 and 64 per rank and a lone request;
# ep_comm.py's exchange timings at 1 / 2 / 64 / 128 tokens per rank; gpu_serve_dp.sh (c = 1 .. 128, DP=2 also 256).
#   bash benchmarks/gpu_lone_serve.sh
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out"
PART_PREFIX=ls_
TAIL=${TAIL:-6}
source "$(dirname "$0")/parts.sh"
part dp1 90 python3 benchmarks/decode.py --batch-sizes 1,64 --out "$out/ls_dp1.json"
part dp2 110 python3 benchmarks/decode.py --data-parallel-size 2 --ep-dispatch p2p --batch-sizes 1,64 \
    --lone-batch-sizes 1 --out "$out/ls_dp2.json"
part ep_time 60 python3 benchmarks/ep_comm.py --world 2 --tokens 1,2,64,128 --out "$out/ls_ep_time.json"
part serve 420 env OUT="$out" bash benchmarks/gpu_serve_dp.sh
echo
echo "== a lone request and serving ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("dp1", "dp2"):
    rows = json.loads((out / f"ls_{name}.json").read_text())["rows"]
    print(f"{name}:", ", ".join(f"b{r['batch']}{' lone' if r.get('lone') else ''} {r['step_ms']:.2f} ms" for r in rows))
PY
grep -vE "Warning|warn|^\s*$|CudaIPC" "$out/ls_ep_time.log" | tail -6
tail -10 "$out/ls_serve.log"
