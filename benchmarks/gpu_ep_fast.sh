#!/usr/bin/env bash
# The expert-parallel fast path after session 9's changes (2 GPUs; device machine, repo root; PYTHONPATH,
# elastic/kernels and NVLink multicast off set up by the caller). Parts (${OUT:-.}/epf_*):
#   1. checks: ep_comm.py --check (real bf16 experts, the push's pair sums bit-equal to the experts' own; the
#      barrier's PTX), gpu_check_fused.py (rotary into the cache bit-equal to rotary + store), gpu_check_mixed.py
#      (mixed-step graphs: tile-map attention, a step against eager, every family's generations), gpu_check_engine.py
#      (every family against transformers on one GPU), gpu_check_dp.py (fp32 DP=2 p2p = one GPU, bf16 agreement);
#   2. ep_comm.py timing at 1/2/64/128 tokens per rank (p2p with and without its barriers);
#   3. decode.py, Qwen3-30B-A3B shape: DP=2 p2p and DP=1 at ${BATCHES:-1,16,64} per rank;
#   4. profile_dp_step.py at 1 and 64 per rank: kernel table and the exchange kernels' waits by layer; and a
#      1 024-token prefill on rank 0 beside an idle rank 1, and on one GPU alone;
#   5. with SERVE=1: serving at c=1 and c=64, DP=1 then DP=2.
#   bash benchmarks/gpu_ep_fast.sh
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out"
PART_PREFIX=epf_
TAIL=${TAIL:-6}
source "$(dirname "$0")/parts.sh"
batches=${BATCHES:-1,16,64}
part check 90 python3 benchmarks/ep_comm.py --world 2 --check --tokens 1,2,7,64,300
part fused 120 python3 benchmarks/gpu_check_fused.py --no-bench --out "$out/epf_fused.json"
part mixed 120 python3 benchmarks/gpu_check_mixed.py --out "$out/epf_mixed.json"
grep -E "bit-equal|identical" "$out/epf_mixed.log" | sed 's/.*\r//'
part engine 240 python3 benchmarks/gpu_check_engine.py --skip-30b --out "$out/epf_engine.json"
part check_dp 200 python3 benchmarks/gpu_check_dp.py --world 2 --skip-30b --families qwen3_moe --modes p2p \
    --out "$out/epf_check_dp.json"
part comm 60 python3 benchmarks/ep_comm.py --world 2 --tokens 1,2,64,128 --out "$out/epf_comm.json"
part dp2 100 python3 benchmarks/decode.py --shape qwen3-30b-a3b --data-parallel-size 2 --ep-dispatch p2p \
    --batch-sizes "$batches" --out "$out/epf_dp2.json"
part dp1 80 python3 benchmarks/decode.py --shape qwen3-30b-a3b --batch-sizes "$batches" --out "$out/epf_dp1.json"
TAIL=2 part profile 150 python3 benchmarks/profile_dp_step.py --world 2 --mode p2p --batches 1,64 --prefill 1024
TAIL=2 part profile_dp1 100 python3 benchmarks/profile_dp_step.py --world 1 --batches 1 --prefill 1024
grep -hE "median step|_kernel: first layer|prefill of" "$out/epf_profile.log" "$out/epf_profile_dp1.log"
if [ "${SERVE:-0}" = 1 ]; then  # a short serving comparison: c=1 and c=64, one GPU against two
  TAG=dp1 CONCS="1 64" part serve_dp1 150 bash benchmarks/gpu_serve.sh
  TAG=dp2 CONCS="1 64" part serve_dp2 150 bash benchmarks/gpu_serve.sh --data-parallel-size 2
  for f in "$out"/dp*_c*.json; do
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], round(r['output_throughput']), 'tok/s, TTFT', round(r['mean_ttft_ms'], 1), 'ms, TPOT', round(r['mean_tpot_ms'], 2), 'ms, failed', r['failed'])" "$f"
  done
fi
echo
echo "== EP fast path ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
grep -c "bit-equal to the experts' sums: True; close to all-gather: True" "$out/epf_check.log"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("dp2", "dp1"):
    try:
        d = json.loads((out / f"epf_{name}.json").read_text())
    except Exception:
        continue
    print(f"{name}:", ", ".join(f"b{r['batch']} {r['step_ms']:.2f} ms ({r['ratio']:.3f}x floor, {r['tokens_per_s']:.0f} tok/s)"
                               for r in d["rows"]))
try:
    d = json.loads((out / "epf_comm.json").read_text())
    print("p2p graph us:", ", ".join(f"{r['tokens_per_rank']}: {r['p2p_graph_us']:.1f} (no barrier "
                                     f"{r['p2p_no_barrier_graph_us']:.1f})" for r in d["rows"]))
except Exception:
    pass
PY
