#!/usr/bin/env bash
# Elastic scaling on GPUs (device machine, repo root): a Qwen3-30B-A3B-shaped dummy model under continuous
# streaming load, scaled by POST /scale. Usage: bash benchmarks/gpu_scale.sh START SCHEDULE [serve args...]
#   bash benchmarks/gpu_scale.sh 1 2,1      # 1 -> 2 -> 1
#   bash benchmarks/gpu_scale.sh 2 1,2      # 2 -> 1 -> 2
# Results in ${OUT:-.}/scale_<start>_<schedule>.json (+ .png, server log).
set -uo pipefail
out=${OUT:-.}
start=$1; schedule=$2; shift 2
name="scale_${start}_${schedule//,/-}"
port=8013
key=scale-bench
model=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import dummy_model_dir; print(dummy_model_dir('qwen3-30b-a3b'))")
python3 -m elastic serve "$model" --load-format dummy --skip-tokenizer-init --max-model-len 4096 \
    --port $port --host 127.0.0.1 --served-model-name qwen3-30b-a3b-dummy --disable-uvicorn-access-log \
    -dp "$start" --admin-api-key $key "$@" > "$out/$name.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 1 300); do
  curl -sf http://127.0.0.1:$port/health >/dev/null && break
  kill -0 $server 2>/dev/null || { tail -30 "$out/$name.log"; exit 1; }
  sleep 1
done
# Standby engines (on by default on CUDA) prewarm on the spare GPUs after the server is up; a server that runs
# for a while has them ready before its first scale, so wait for that (at most 240 s) before the load starts.
for _ in $(seq 1 240); do
  curl -sf http://127.0.0.1:$port/scale | python3 -c 'import json, sys; s = json.load(sys.stdin).get("standby", [])
sys.exit(0 if all(x["ready"] for x in s) else 1)' && break
  sleep 1
done
python3 benchmarks/scale.py --base-url http://127.0.0.1:$port --admin-api-key $key --schedule "$schedule" \
    --concurrency 32 --input-len 512 --output-len 128 --vocab-size 151936 --steady-s 15 --settle-s 15 \
    --out "$out/$name.json" --plot "$out/$name.png" 2>&1 | tail -25
