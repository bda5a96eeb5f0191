#!/usr/bin/env bash
# GPU serving benchmark (run on the device machine from the repo root): serve a Qwen3-30B-A3B-shaped
# dummy model, drive it with benchmarks/serve.py, shut it down. Results go to ${OUT:-.}/serve_*.json.
# Extra arguments go to `elastic serve`, e.g. `bash benchmarks/gpu_serve.sh --data-parallel-size 2`.
# CONCS: concurrencies (4 x c requests each); BURST=1: first a c=16 burst on the fresh server (_burst.json);
# RATES: then Poisson arrival rates, requests per second (_r<rate>.json). STEP_TRACE=1: the engines' step
# traces in ${OUT:-.}/${TAG}_trace (benchmarks/step_trace_report.py; its --last-run is the last rate's run).
set -uo pipefail
out=${OUT:-.}
model=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import dummy_model_dir; print(dummy_model_dir('qwen3-30b-a3b'))")
[ "${STEP_TRACE:-0}" = 1 ] && export ELASTIC_STEP_TRACE="$out/${TAG:-serve}_trace"
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
if [ "${BURST:-0}" = 1 ]; then  # the fresh server's first burst (kernels compiled at start-up, or not)
  python3 benchmarks/serve.py --base-url http://127.0.0.1:8011 --vocab-size 151936 --num-prompts 64 \
      --input-len 1024 --output-len 128 --max-concurrency 16 --no-progress --seed 1 \
      --result-json "$out/${TAG:-serve}_burst.json" 2>&1 | tail -22
fi
for conc in ${CONCS:-1 16 64}; do
  python3 benchmarks/serve.py --base-url http://127.0.0.1:8011 --vocab-size 151936 --num-prompts $((conc * 4)) \
      --input-len 1024 --output-len 128 --max-concurrency $conc --no-progress --seed 0 \
      --result-json "$out/${TAG:-serve}_c$conc.json" 2>&1 | tail -22
done
for rate in ${RATES:-}; do  # Poisson arrivals at this many requests per second, 20 s of them, no cap in flight
  python3 benchmarks/serve.py --base-url http://127.0.0.1:8011 --vocab-size 151936 \
      --num-prompts "$(python3 -c "print(int(20 * $rate))")" --input-len 1024 --output-len 128 --request-rate "$rate" \
      --no-progress --seed 2 --result-json "$out/${TAG:-serve}_r$rate.json" 2>&1 | tail -22
done
