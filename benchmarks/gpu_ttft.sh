#!/usr/bin/env bash
# Where time to first token goes under data parallelism (2 GPUs; device machine, repo root; PYTHONPATH,
# elastic/kernels and NVLink multicast off set up by the caller). Parts (${OUT:-.}/ttft_*):
#   1. profile_dp_step.py: one 1 024-token prefill on rank 0 beside an idle rank 1, and beside 32 decoding
#      requests on rank 1 (step time, kernel time, the exchange kernels' waits by layer);
#   2. serving, DP=1 at ${RATE:-8} requests/s then DP=2 at twice that (equal load per rank), each after a
#      c=16 warm-up burst, with the engines' step traces (ELASTIC_STEP_TRACE) summarized by kind of step.
#   bash benchmarks/gpu_ttft.sh
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out"
PART_PREFIX=ttft_
TAIL=${TAIL:-4}
source "$(dirname "$0")/parts.sh"
rate=${RATE:-8}
part profile 200 python3 benchmarks/profile_dp_step.py --world 2 --mode p2p --batches 1 --prefill 1024 --beside 0,32
grep -hE "median step|_kernel: first layer|prefill of" "$out/ttft_profile.log"
for dp in 1 2; do
  STEP_TRACE=1 TAG=ttft_dp$dp BURST=1 CONCS="${CONCS:- }" RATES="$((dp * rate))" \
      part "serve_dp$dp" 200 bash benchmarks/gpu_serve.sh --data-parallel-size $dp
  python3 benchmarks/step_trace_report.py --last-run "$out/ttft_dp${dp}_trace"
done
for f in "$out"/ttft_dp*_r*.json "$out"/ttft_dp*_c*.json; do
  [ -f "$f" ] && python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], round(r['output_throughput']), 'tok/s, TTFT mean', round(r['mean_ttft_ms'], 1), 'median', round(r['median_ttft_ms'], 1), 'p99', round(r['p99_ttft_ms'], 1), 'ms, TPOT', round(r['mean_tpot_ms'], 2), 'ITL p99', round(r['p99_itl_ms'], 1), 'failed', r['failed'])" "$f"
done
echo "== TTFT under DP ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
