#!/usr/bin/env bash
# Expert-parallel fast path on 2+ GPUs (device machine, repo root; PYTHONPATH and elastic/kernels set up by the
# caller). Each part runs under its own timeout so one failure keeps the others' results (${OUT:-.}/ep_*):
#   1. benchmarks/ep_comm.py: dispatch + combine per layer, all-to-all / all-gather / p2p, eager and graphed;
#   2. benchmarks/gpu_check_dp.py on tiny checkpoints: DP=N greedy vs DP=1 (fp32 identical; bf16 agreement),
#      then the 30B-shaped dummy's offline throughput for all-gather vs p2p;
#   3. benchmarks/decode.py, Qwen3-30B-A3B shape: DP=1 on one GPU, then DP=N with p2p and with all-gather,
#      step time against each rank's memory floor at 1/16/64/128 tokens per rank.
#   WORLD=2 bash benchmarks/gpu_ep.sh
#   WORLD=4 SKIP_30B=1 RUNS="4 p2p" bash benchmarks/gpu_ep.sh   # only the DP=4 p2p decode run
set -uo pipefail
out=${OUT:-.}
world=${WORLD:-2}
mkdir -p "$out"
PART_PREFIX=ep_
TAIL=${TAIL:-16}
source "$(dirname "$0")/parts.sh"

part comm ${COMM_S:-100} python3 benchmarks/ep_comm.py --world "$world" --out "$out/ep_comm.json"
part check ${CHECK_S:-160} python3 benchmarks/gpu_check_dp.py --world "$world" --families qwen3_moe --modes allgather,p2p \
    ${SKIP_30B:+--skip-30b} --out "$out/ep_check.json"
IFS=, read -ra runs <<< "${RUNS:-1 auto,$world p2p,$world allgather}"
for run in "${runs[@]}"; do
  set -- $run
  part "decode_dp$1_$2" ${DECODE_S:-105} python3 benchmarks/decode.py --shape qwen3-30b-a3b --data-parallel-size "$1" \
      --ep-dispatch "$2" --batch-sizes ${BATCHES:-1,16,64,128} --context 1024 --out "$out/ep_decode_dp$1_$2.json"
done
echo
echo "== expert-parallel summary ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null), $world GPUs)"
printf '%s\n' "${status[@]}"
