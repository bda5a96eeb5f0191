#!/usr/bin/env bash
# Fault recovery on 2 GPUs (device machine, repo root): a Qwen3-30B-A3B-shaped dummy model, started at one
# rank (so its KV cache leaves room for one rank to hold every expert) and scaled to 2, under 32 streaming
# clients; kill -9 of rank 1, then (once back at 2 ranks) of the DP coordinator. Measures the
# time from each kill to serving again (server side, and the longest token gap clients saw), the time back
# at 2 ranks, and the failed requests (there should be none). Total < 7 minutes.
#   bash benchmarks/gpu_chaos.sh [more serve args...]
# Results in ${OUT:-.}/chaos_gpu.json (+ .png, server log); a short table last.
# Greedy outputs are not compared ("wrong" in the JSON means nothing here): the experts only rank 1 held
# are restored as fresh random weights, since a dummy model has no checkpoint to read them from.
set -uo pipefail
out=$(realpath "${OUT:-.}")
model=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import dummy_model_dir; print(dummy_model_dir('qwen3-30b-a3b'))")
cd benchmarks
timeout 400 python3 chaos.py --model "$model" --start-dp 1 --dp 2 --api-servers 1 --sequence rank-1,coordinator \
    --duration 150 --kill-every 40 --concurrency 32 --prompts 64 --input-len 512 --output-len 128 \
    --vocab-size 151936 --out "$out/chaos_gpu.json" --plot "$out/chaos_gpu.png" --server-log "$out/chaos_gpu.log" \
    -- --load-format dummy --skip-tokenizer-init --max-model-len 4096 "$@" > "$out/chaos_gpu.txt" 2>&1
echo "chaos.py exit code: $?"
grep -E "kill -9|Traceback|Error" "$out/chaos_gpu.txt" | tail -8
grep -E "recovery|restarted in|a collective failed|hangs|killing" "$out/chaos_gpu.log" | cut -c1-200 | tail -20
python3 - "$out/chaos_gpu.json" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"no result: {e}")
print(f"\nrequests: sent {r['sent']}, completed {r['completed']}, re-run {r['rerun']}, failed {r['failed']}"
      f" (errors: {r['errors']})")
print(f"{'kill':<12} {'serving again (server) s':>25} {'longest token gap s':>20} {'back at 2 ranks s':>18} result")
for k in r["kills"]:
    print(f"{k['target']:<12} {k.get('serving_s')!s:>25} {k.get('stall_s')!s:>20} {k.get('restored_s')!s:>18} "
          f"{k['result']}")
EOF
