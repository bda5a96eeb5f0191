#!/usr/bin/env bash
# Tune the fused MoE for one rank's share of Qwen3-30B-A3B's experts under DP=2 (64 slots a rank; device machine,
# repo root; PYTHONPATH, elastic/kernels and NVLink multicast off set up by the caller), with decode.py DP=2 p2p
# before and after it in the same call (1 and 64 per rank, a lone request), DP=1 at 1 as a control.
# The table lands in kernels/configs/ (copied to ${OUT:-.}/tune_configs/).   bash benchmarks/gpu_tune_ep.sh
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out/tune_configs"
PART_PREFIX=tune_
TAIL=${TAIL:-4}
source "$(dirname "$0")/parts.sh"
dp2=(python3 benchmarks/decode.py --data-parallel-size 2 --ep-dispatch p2p --batch-sizes 1,64 --lone-batch-sizes 1)
part dp2_before 125 "${dp2[@]}" --out "$out/tune_dp2_before.json"
part tune 240 python3 benchmarks/moe_kernel.py --tune --no-bench --ep 2 --shapes qwen3-30b-a3b \
    --tokens 2,4,8,16,32,64,128,256,512,1024,2048,4096,8192 --out "$out/tune_ep2.json"
cp kernels/configs/E=64,N=768,* "$out/tune_configs/" 2>/dev/null
part dp2_after 125 "${dp2[@]}" --out "$out/tune_dp2_after.json"
part dp1 85 python3 benchmarks/decode.py --batch-sizes 1 --out "$out/tune_dp1.json"
echo
echo "== EP tuning ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
grep -h "us (up + down" "$out/tune_tune.log" | sed 's/  {.*//'
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("dp2_before", "dp2_after", "dp1"):
    try:
        d = json.loads((out / f"tune_{name}.json").read_text())
    except Exception:
        continue
    print(f"{name}:", ", ".join(f"b{r['batch']}{' lone' if r.get('lone') else ''} {r['step_ms']:.2f} ms "
                               f"({r['ratio']:.3f}x floor)" for r in d["rows"]))
PY
