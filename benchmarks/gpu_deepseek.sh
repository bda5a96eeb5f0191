#!/usr/bin/env bash
# DeepSeek-V2/V3 on one GPU (device machine, repo root; PYTHONPATH and elastic/kernels set up by the caller):
#   1. bf16 and fp32 CUDA paths against the CPU fp32 path on tiny random checkpoints of both families,
#      and the MLA Triton kernels in bf16 against their reference (V2-Lite and V3 dims, CUDA graph, timing);
#   2. benchmarks/decode.py on the DeepSeek-V2-Lite shape (dummy weights) at batch 1, 16 and 64 against its
#      memory floor, with the latent cache's bytes per token beside an expanded K/V cache;
#   3. offline throughput of the same shape (serving numbers).
# Each part runs under its own timeout (at most 460 s in all), so one failure keeps the others' results;
# ~5 minutes on one H100.
#   bash benchmarks/gpu_deepseek.sh          # results in ${OUT:-.}/deepseek_*.json and *.log
#   TUNE=1 bash benchmarks/gpu_deepseek.sh   # first tunes the fused-MoE table for E=64, I=1408 (+4 min; the
#                                            # table is copied to $OUT, to be committed under kernels/configs/)
set -uo pipefail
out=${OUT:-.}
mkdir -p "$out"
PART_PREFIX=deepseek_
source "$(dirname "$0")/parts.sh"

if [ "${TUNE:-0}" = 1 ]; then  # optional: tune the fused-MoE table for V2-Lite's experts first (kept in $OUT)
  part tune 240 python3 benchmarks/moe_kernel.py --tune --no-bench --shapes deepseek-v2-lite --out "$out/deepseek_tune.json"
  cp kernels/configs/E=64,N=1408,* "$out/" 2>/dev/null
fi
part check 120 python3 benchmarks/gpu_check_deepseek.py --out "$out/deepseek_check.json"
part decode 200 python3 benchmarks/decode.py --shape deepseek-v2-lite --batch-sizes 1,16,64 --context 1024 \
    --out "$out/deepseek_decode.json"
part offline 140 python3 benchmarks/offline.py --shape deepseek-v2-lite --device cuda --num-prompts 256 \
    --input-len 512 --output-len 128 --max-num-seqs 128 --json "$out/deepseek_offline.json"

echo
echo "== DeepSeek GPU summary ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${status[@]}"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception as e:  # a part that failed leaves no file
        print(f"{name}: missing ({type(e).__name__})")
        return None
check = load("deepseek_check.json")
if check:
    for r in check["families"]:
        print(f"{r['family']:<12} {r['dtype']:<9} logit rel err {r['logit_rel_err']:.2e}  top1 {r['prefill_top1_agree']:.3f}"
              f"  greedy identical {r['greedy_identical']:.2f}  recapture {r.get('same_after_graph_recapture', '-')}")
    for r in check["kernels"]:
        print(f"kernel {r['case']:<22} " + (f"exact {r['exact']}" if "exact" in r else
              f"rel err {r['rel_err']:.2e} graph {r.get('graph_equal', '-')} us {r.get('us', float('nan')):.1f}"))
dec = load("deepseek_decode.json")
if dec:
    print(f"deepseek-v2-lite decode, context {dec['context']}: KV {dec['kv_bytes_per_token'] / 1024:.1f} KiB/token "
          f"(expanded {dec['kv_bytes_per_token_expanded'] / 1024:.1f} KiB, "
          f"{dec['kv_bytes_per_token_expanded'] / dec['kv_bytes_per_token']:.1f}x less), {dec['kv_tokens']} tokens fit")
    print(f"{'batch':>5} {'step ms':>8} {'floor ms':>9} {'x floor':>8} {'tok/s':>8}")
    for r in dec["rows"]:
        print(f"{r['batch']:>5} {r['step_ms']:8.2f} {r['floor_ms']:9.2f} {r['ratio']:8.2f} {r['tokens_per_s']:8.0f}")
off = load("deepseek_offline.json")
if off:
    print("offline:", json.dumps(off))
PY
