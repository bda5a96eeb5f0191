#!/usr/bin/env bash
# The exchange's fusions against the code before them, in one call (device machine, repo root; PYTHONPATH,
# elastic/kernels and NVLink multicast off set up by the caller; 2 GPUs). OLD: a tree of the code before (default
# .old: `git archive <commit> elastic kernels benchmarks | tar -x -C .old`, carried, with its own elastic/kernels
# link). Parts (${OUT:-.}/fold_*): decode.py DP=1 at 1 and 64 (new), DP=2 p2p at 1 and 64 per rank and a lone
# request, new then old; gpu_check_dp.py (fp32 DP=2 = one GPU, bf16 agreement, p2p); ep_comm.py --check; the lone
# request's kernel timeline (profile_dp_step.py --lone); ENGINE=1: gpu_check_engine.py too.
#   bash benchmarks/gpu_fold_ab.sh
set -uo pipefail
out=${OUT:-.}
old=${OLD:-.old}
mkdir -p "$out"
PART_PREFIX=fold_
TAIL=${TAIL:-3}
source "$(dirname "$0")/parts.sh"
new_path=$PYTHONPATH
part dp1_new 100 python3 benchmarks/decode.py --batch-sizes 1,2,64 --out "$out/fold_dp1_new.json"
for arm in new old; do
  tree=.
  if [ $arm = old ]; then tree=$old; export PYTHONPATH=${new_path/$PWD/$PWD/$old}; fi
  part "dp2_$arm" 130 python3 "$tree/benchmarks/decode.py" --data-parallel-size 2 --ep-dispatch p2p --batch-sizes 1,2,64 \
      --lone-batch-sizes 1 --out "$out/fold_dp2_$arm.json"
done
export PYTHONPATH=$new_path
part check_dp 200 python3 benchmarks/gpu_check_dp.py --world 2 --skip-30b --families qwen3_moe,qwen2_moe --modes p2p \
    --out "$out/fold_check_dp.json"
part ep_check 60 python3 benchmarks/ep_comm.py --world 2 --check --tokens 1,2,7,64,300
part ep_time 90 python3 benchmarks/ep_comm.py --world 2 --tokens 1,2,64,128 --out "$out/fold_ep_time.json"
part profile 120 python3 benchmarks/profile_dp_step.py --world 2 --mode p2p --batches 1 --steps 20 --lone
[ "${ENGINE:-0}" = 1 ] && part engine 200 python3 benchmarks/gpu_check_engine.py --skip-30b --out "$out/fold_engine.json"
echo
echo "== fusions new / old ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
tail -6 "$out/fold_check_dp.log"
grep -A16 "kernel timeline" "$out/fold_profile.log" | head -17
[ -f "$out/fold_engine.log" ] && grep -iE "pass|fail|ok|identical" "$out/fold_engine.log" | tail -8
grep -E "bit-equal|differ" "$out/fold_ep_check.log" | tail -6
grep -vE "Warning|warn|^\s*$|CudaIPC" "$out/fold_ep_time.log" | tail -8
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("dp1_new", "dp2_new", "dp2_old"):
    try:
        d = json.loads((out / f"fold_{name}.json").read_text())
    except Exception:
        continue
    print(f"{name}:", ", ".join(f"b{r['batch']}{' lone' if r.get('lone') else ''} {r['step_ms']:.2f} ms "
                               f"({r['ratio']:.3f}x floor)" for r in d["rows"]))
PY
