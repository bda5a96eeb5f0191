#!/usr/bin/env bash
# The p2p exchange with the experts' pair sums done by the combine push (2 GPUs; device machine, repo root;
# PYTHONPATH, elastic/kernels and NVLink multicast off set up by the caller). Parts (${OUT:-.}/epf_*):
#   1. ep_comm.py --check: real bf16 experts, fused pair sums bit-equal to the unfused path (+ barrier PTX);
#   2. decode.py, Qwen3-30B-A3B shape: DP=2 p2p as shipped, DP=2 unfused (FusedMoE.compute_local_pairs patched
#      to None in this copy), DP=1;
#   3. profile_dp_step.py at 1 and 64 per rank: kernel table and the exchange kernels' waits by layer;
#   4. ep_comm.py timing at 1/64/128 tokens per rank, default programs and 32 per destination;
#   5. with CHECK_DP=1: gpu_check_dp.py (fp32 DP=2 p2p = one GPU, bf16 agreement).
#   bash benchmarks/gpu_ep_fused.sh
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out"
PART_PREFIX=epf_
TAIL=${TAIL:-14}
source "$(dirname "$0")/parts.sh"
batches=${BATCHES:-1,64}
part check 90 python3 benchmarks/ep_comm.py --world 2 --check --tokens 1,7,64,300
part dp2 100 python3 benchmarks/decode.py --shape qwen3-30b-a3b --data-parallel-size 2 --ep-dispatch p2p \
    --batch-sizes "$batches" --out "$out/epf_dp2.json"
cp elastic/layers/moe.py /tmp/moe.py.orig
trap 'cp /tmp/moe.py.orig elastic/layers/moe.py' EXIT  # restored even if stopped
sed -i 's/        if self.backend is not fused_moe:/        if True:  # patched: unfused/' elastic/layers/moe.py
part dp2_unfused 100 python3 benchmarks/decode.py --shape qwen3-30b-a3b --data-parallel-size 2 --ep-dispatch p2p \
    --batch-sizes "$batches" --out "$out/epf_dp2_unfused.json"
cp /tmp/moe.py.orig elastic/layers/moe.py
part dp1 75 python3 benchmarks/decode.py --shape qwen3-30b-a3b --batch-sizes "$batches" --out "$out/epf_dp1.json"
TAIL=4 part profile 150 python3 benchmarks/profile_dp_step.py --world 2 --mode p2p --batches "$batches"
grep -E "median step|_kernel: first layer|p2p_|_moe_sum" "$out/epf_profile.log" | grep -v "^ *$" | head -20
part comm 60 python3 benchmarks/ep_comm.py --world 2 --tokens 1,64,128 --out "$out/epf_comm.json"
part comm32 60 python3 benchmarks/ep_comm.py --world 2 --tokens 1,64,128 --max-programs 32 \
    --out "$out/epf_comm32.json"
if [ "${CHECK_DP:-0}" = 1 ]; then
  part check_dp 200 python3 benchmarks/gpu_check_dp.py --world 2 --skip-30b --families qwen3_moe --modes p2p \
      --out "$out/epf_check_dp.json"
fi
echo
echo "== p2p pair sums in the push ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("dp2_unfused", "dp2", "dp1"):
    try:
        d = json.loads((out / f"epf_{name}.json").read_text())
    except Exception:
        continue
    print(f"{name}:", ", ".join(f"b{r['batch']} {r['step_ms']:.2f} ms ({r['ratio']:.3f}x floor, {r['tokens_per_s']:.0f} tok/s)"
                               for r in d["rows"]))
for name in ("comm", "comm32"):
    try:
        d = json.loads((out / f"epf_{name}.json").read_text())
    except Exception:
        continue
    print(f"{name}: p2p graph us", ", ".join(f"{r['tokens_per_rank']}: {r['p2p_graph_us']:.1f}" for r in d["rows"]))
PY
