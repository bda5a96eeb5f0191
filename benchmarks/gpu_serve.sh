#!/usr/bin/env bash
# GPU serving benchmark (run on the device machine from the repo root): serve a Qwen3-30B-A3B-shaped
# dummy model, drive it with benchmarks/serve.py, shut it down. Results go to ${OUT:-.}/serve_*.json.
# Extra arguments go to `elastic serve`, e.g. `bash benchmarks/gpu_serve.sh --data-parallel-size 2`.
set -uo pipefail
out=${OUT:-.}
model=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import dummy_model_dir; print(dummy_model_dir('qwen3-30b-a3b'))")
python3 -m elastic serve "$model" --load-format dummy --skip-tokenizer-init --max-model-len 4096 \
    --port 8011 --host 127.0.0.1 --served-model-name qwen3-30b-a3b-dummy --disable-uvicorn-access-log "$@" \
    > "$out/${TAG:-serve}_server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 1 240); do
  curl -sf http://127.0.0.1:8011/health >/dev/null && break
  kill -0 $server 2>/dev/null || { tail -30 "$out/${TAG:-serve}_server.log"; exit 1; }
  sleep 1
done
for conc in ${CONCS:-1 16 64}; do
  python3 benchmarks/serve.py --base-url http://127.0.0.1:8011 --vocab-size 151936 --num-prompts $((conc * 4)) \
      --input-len 1024 --output-len 128 --max-concurrency $conc --no-progress --seed 0 \
      --result-json "$out/${TAG:-serve}_c$conc.json" 2>&1 | tail -22
done
