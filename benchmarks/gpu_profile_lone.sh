#!/usr/bin/env bash
# Where a lone request's decode step spends its GPU time, one GPU against two (device machine, repo root;
# PYTHONPATH, elastic/kernels and NVLink multicast off set up by the caller; 2 GPUs): profile_dp_step.py's
# kernel timeline of rank 0 for DP=1 at one request and DP=2 p2p with one request on rank 0, the other idle.
# Parts: ${OUT:-.}/lone_*.log
#   bash benchmarks/gpu_profile_lone.sh
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out"
PART_PREFIX=lone_
TAIL=${TAIL:-32}
source "$(dirname "$0")/parts.sh"
part dp1 150 python3 benchmarks/profile_dp_step.py --world 1 --mode p2p --batches 1 --steps 20
part dp2 200 python3 benchmarks/profile_dp_step.py --world 2 --mode p2p --batches 1 --steps 20 --lone
echo
echo "== lone request profile ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
