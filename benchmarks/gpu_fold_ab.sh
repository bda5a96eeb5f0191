#!/usr/bin/env bash
# The exchange's fusions against the code before them, in one call (device machine, repo root; PYTHONPATH,
# elastic/kernels and NVLink multicast off set up by the caller; 2 GPUs). OLD: a tree of the code before (default
# .old: `git archive <commit> elastic kernels benchmarks | tar -x -C .old`, carried, with its own elastic/kernels
# link). Parts (${OUT:-.}/fold_*): decode.py DP=1 at 1 and 64, DP=2 p2p at 1 and 64 per rank and a lone request,
# new then old; gpu_check_dp.py (fp32 DP=2 = one GPU, bf16 agreement, p2p); ep_comm.py --check.
#   bash benchmarks/gpu_fold_ab.sh
set -uo pipefail
out=${OUT:-.}
old=${OLD:-.old}
mkdir -p "$out"
PART_PREFIX=fold_
TAIL=${TAIL:-3}
source "$(dirname "$0")/parts.sh"
new_path=$PYTHONPATH
for arm in new old; do
  tree=.
  if [ $arm = old ]; then tree=$old; export PYTHONPATH=${new_path/$PWD/$PWD/$old}; fi
  part "dp1_$arm" 90 python3 "$tree/benchmarks/decode.py" --batch-sizes 1,64 --out "$out/fold_dp1_$arm.json"
  part "dp2_$arm" 130 python3 "$tree/benchmarks/decode.py" --data-parallel-size 2 --ep-dispatch p2p --batch-sizes 1,64 \
      --lone-batch-sizes 1 --out "$out/fold_dp2_$arm.json"
done
export PYTHONPATH=$new_path
part check_dp 150 python3 benchmarks/gpu_check_dp.py --world 2 --skip-30b --families qwen3_moe --modes p2p \
    --out "$out/fold_check_dp.json"
part ep_check 60 python3 benchmarks/ep_comm.py --world 2 --check --tokens 1,7,64,300
echo
echo "== fusions new / old ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
tail -4 "$out/fold_check_dp.log"
grep -E "bit-equal|differ" "$out/fold_ep_check.log" | tail -4
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("dp1_new", "dp1_old", "dp2_new", "dp2_old"):
    try:
        d = json.loads((out / f"fold_{name}.json").read_text())
    except Exception:
        continue
    print(f"{name}:", ", ".join(f"b{r['batch']}{' lone' if r.get('lone') else ''} {r['step_ms']:.2f} ms "
                               f"({r['ratio']:.3f}x floor)" for r in d["rows"]))
PY
