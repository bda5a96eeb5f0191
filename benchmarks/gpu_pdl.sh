#!/usr/bin/env bash
# Programmatic dependent launch (PDL), on against off (ELASTIC_PDL=0) in one call, 2 GPUs (device machine, repo
# root; PYTHONPATH, elastic/kernels and NVLink multicast off set up by the caller). Parts (${OUT:-.}/pdl_*):
#   decode.py, Qwen3-30B-A3B shape: DP=2 p2p at 1 and 64 per rank and a lone request (rank 1 idle), DP=1 at 1
#   and 64, each with PDL on and off; ep_comm.py timings on and off; ep_comm.py --check with PDL on.
#   bash benchmarks/gpu_pdl.sh
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out"
PART_PREFIX=pdl_
TAIL=${TAIL:-4}
source "$(dirname "$0")/parts.sh"
for pdl in 1 0; do
  ELASTIC_PDL=$pdl part "dp2_$pdl" 125 python3 benchmarks/decode.py --data-parallel-size 2 --ep-dispatch p2p \
      --batch-sizes 1,64 --lone-batch-sizes 1 --out "$out/pdl_dp2_$pdl.json"
done
for pdl in 1 0; do
  ELASTIC_PDL=$pdl part "dp1_$pdl" 85 python3 benchmarks/decode.py --batch-sizes 1,64 --out "$out/pdl_dp1_$pdl.json"
done
for pdl in 1 0; do
  ELASTIC_PDL=$pdl part "comm_$pdl" 45 python3 benchmarks/ep_comm.py --world 2 --tokens 1,64,128 \
      --out "$out/pdl_comm_$pdl.json"
done
part check 60 python3 benchmarks/ep_comm.py --world 2 --check --tokens 1,2,7,64,300
echo
echo "== PDL on / off ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
grep -c "bit-equal to the experts' sums: True; close to all-gather: True" "$out/pdl_check.log"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("dp2_1", "dp2_0", "dp1_1", "dp1_0"):
    try:
        d = json.loads((out / f"pdl_{name}.json").read_text())
    except Exception:
        continue
    print(f"{name}:", ", ".join(f"b{r['batch']}{' lone' if r.get('lone') else ''} {r['step_ms']:.2f} ms "
                               f"({r['ratio']:.3f}x floor)" for r in d["rows"]))
for name in ("comm_1", "comm_0"):
    try:
        d = json.loads((out / f"pdl_{name}.json").read_text())
        print(f"{name} p2p graph us:", ", ".join(f"{r['tokens_per_rank']}: {r['p2p_graph_us']:.1f}" for r in d["rows"]))
    except Exception:
        pass
PY
