#!/usr/bin/env bash
# Pipelined decode (the default with CUDA) against stepping one step at a time, on one GPU (device machine,
# repo root; PYTHONPATH and elastic/kernels set up by the caller):
#   1. gpu_check_async.py: the same greedy tokens and finishes both ways (DeepSeek-V2-Lite shape, dummy weights);
#   2. decode.py, V2-Lite shape, batch 1 / 16 / 64, both ways (against the memory floor);
#   3. serving the Qwen3-30B-A3B shape (gpu_serve.sh) stepwise, pipelined launching each step at once (the
#      session-7 behaviour: LAUNCH_MARGIN_S patched to 1 s in this copy), and pipelined as shipped (a launch
#      waits, taking inputs, until the step on its way nearly ends).
# ~9 minutes on one H100. Results: ${OUT:-.}/async_*.json, *.log, a table printed last.
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out"
PART_PREFIX=async_
source "$(dirname "$0")/parts.sh"

part check 150 python3 benchmarks/gpu_check_async.py --shape deepseek-v2-lite --out "$out/async_check.json"
part v2_sync 100 python3 benchmarks/decode.py --shape deepseek-v2-lite --batch-sizes 1,16,64 \
    --no-async-scheduling --out "$out/async_v2_sync.json"
part v2_pipe 100 python3 benchmarks/decode.py --shape deepseek-v2-lite --batch-sizes 1,16,64 \
    --out "$out/async_v2_pipe.json"
TAIL=3 CONCS="${CONCS:-1 16 64}" TAG=async_sync part serve_sync 200 bash benchmarks/gpu_serve.sh --no-async-scheduling
if [ "${AT_ONCE:-1}" = 1 ]; then
  cp elastic/engine/pipeline.py /tmp/pipeline.py.orig
  trap 'cp /tmp/pipeline.py.orig elastic/engine/pipeline.py' EXIT  # restored even if this script is stopped
  sed -i 's/^LAUNCH_MARGIN_S = .*/LAUNCH_MARGIN_S = 1.0/' elastic/engine/pipeline.py
  TAIL=3 CONCS="16 64" TAG=async_atonce part serve_atonce 160 bash benchmarks/gpu_serve.sh
  cp /tmp/pipeline.py.orig elastic/engine/pipeline.py
fi
TAIL=3 CONCS="${CONCS:-1 16 64}" TAG=async_late part serve_late 200 bash benchmarks/gpu_serve.sh

echo
echo "== pipelined decode summary ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception as e:  # a failed part leaves no file
        return None
check = load("async_check.json")
print("exactness:", check and f"{check['identical']}/{check['requests']} identical")
for mode in ("sync", "pipe"):
    d = load(f"async_v2_{mode}.json")
    if d:
        print(f"V2-Lite decode {mode}:", ", ".join(f"b{r['batch']} {r['step_ms']:.2f} ms ({r['ratio']:.2f}x)" for r in d["rows"]))
print(f"{'serving':<8} {'c':>3} {'tok/s':>8} {'TTFT mean':>10} {'TTFT p99':>9} {'TPOT':>7} failed")
for mode in ("sync", "atonce", "late"):
    for c in (1, 16, 64):
        d = load(f"async_{mode}_c{c}.json")
        if d:
            print(f"{mode:<8} {c:>3} {d['output_throughput']:>8.0f} {d['mean_ttft_ms']:>10.1f} {d['p99_ttft_ms']:>9.1f} "
                  f"{d['mean_tpot_ms']:>7.2f} {d['failed']}")
PY
