#!/usr/bin/env bash
# Pipelined decode with data parallelism on 2 GPUs (device machine, repo root; PYTHONPATH, elastic/kernels
# and NVLink multicast off set up by the caller). Each part under its own timeout (${OUT:-.}/dpp_*):
#   1. gpu_check_dp.py on tiny checkpoints: DP=2 greedy vs one GPU, fp32 identical (pipelined by default);
#   2. decode.py, Qwen3-30B-A3B shape, DP=2 p2p: stepwise (--no-async-scheduling), then pipelined (default),
#      and DP=1 pipelined: step time against each rank's memory floor;
#   3. with SERVE=1: gpu_serve_dp.sh (DP=1 against DP=2 serving, c = 1/16/64/128(/256));
#   4. with PREFILL=1: DP=2 serving with prefill steps through the p2p exchange (as shipped) and through NCCL
#      (SchedulerConfig.max_step_tokens patched to the decode graphs' largest batch in this copy), and DP=1 beside.
#   bash benchmarks/gpu_dp_pipeline.sh
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out"
PART_PREFIX=dpp_
TAIL=${TAIL:-12}
source "$(dirname "$0")/parts.sh"
batches=${BATCHES:-1,16,64}
if [ "${PREFILL:-0}" = 1 ]; then
  TAIL=3 TAG=dp1 CONCS="1 64" part serve_dp1 200 bash benchmarks/gpu_serve.sh
  TAIL=3 TAG=dp2p2p CONCS="1 16 64 128" part serve_p2p 240 bash benchmarks/gpu_serve.sh --data-parallel-size 2
  cp elastic/config/engine.py /tmp/engine_config.py.orig
  trap 'cp /tmp/engine_config.py.orig elastic/config/engine.py' EXIT  # restored even if stopped
  sed -i 's/return max(self.max_graph_batch, self.max_num_batched_tokens)  # type: ignore\[type-var\]/return self.max_graph_batch/' \
      elastic/config/engine.py
  TAIL=3 TAG=dp2nccl CONCS="1 16 64 128" part serve_nccl 240 bash benchmarks/gpu_serve.sh --data-parallel-size 2
  cp /tmp/engine_config.py.orig elastic/config/engine.py
  python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'setup':<8} {'c':>4} {'tok/s':>7} {'TTFT mean':>9} {'TTFT p99':>9} {'TPOT':>6} failed")
for tag in ("dp1", "dp2p2p", "dp2nccl"):
    for c in (1, 16, 64, 128):
        f = out / f"{tag}_c{c}.json"
        if f.exists():
            r = json.loads(f.read_text())
            print(f"{tag:<8} {c:>4} {r['output_throughput']:7.0f} {r['mean_ttft_ms']:9.1f} {r['p99_ttft_ms']:9.1f} "
                  f"{r['mean_tpot_ms']:6.2f} {r['failed']}")
PY
elif [ "${SERVE:-0}" != 1 ]; then
  part check 200 python3 benchmarks/gpu_check_dp.py --world 2 --skip-30b --families qwen3_moe \
      --modes allgather,p2p --out "$out/dpp_check.json"
  part dp2_sync 110 python3 benchmarks/decode.py --shape qwen3-30b-a3b --data-parallel-size 2 --ep-dispatch p2p \
      --batch-sizes "$batches" --no-async-scheduling --out "$out/dpp_dp2_sync.json"
  part dp2_pipe 110 python3 benchmarks/decode.py --shape qwen3-30b-a3b --data-parallel-size 2 --ep-dispatch p2p \
      --batch-sizes "$batches" --out "$out/dpp_dp2_pipe.json"
  part dp1_pipe 80 python3 benchmarks/decode.py --shape qwen3-30b-a3b --batch-sizes "$batches" \
      --out "$out/dpp_dp1_pipe.json"
else
  TAIL=20 part serve 560 bash benchmarks/gpu_serve_dp.sh
fi
echo
echo "== DP pipelined decode ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("dp2_sync", "dp2_pipe", "dp1_pipe"):
    try:
        d = json.loads((out / f"dpp_{name}.json").read_text())
    except Exception:
        continue
    print(f"{name}:", ", ".join(f"b{r['batch']} {r['step_ms']:.2f} ms ({r['ratio']:.2f}x floor, {r['tokens_per_s']:.0f} tok/s)"
                               for r in d["rows"]))
PY
