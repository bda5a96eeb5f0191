#!/usr/bin/env bash
# Headless split vs one server, 2 GPUs (device machine, repo root), Qwen3-30B-A3B-shaped dummy model:
#   A. one server, -dp 2 (ipc between API server and engines)
#   B. a "head" (API server + rank 0 on cuda:0) and a headless "node" process (rank 1 on cuda:1), joined over
#      TCP loopback with the shared secret (CURVE on every socket), as two machines would be
# Both are driven by benchmarks/serve.py (1024 in / 128 out, concurrency 16 and 64); prints a table last.
# Full output: ${OUT:-.}/headless_*.{log,json}. Usage: bash benchmarks/gpu_headless.sh [extra serve args]
set -uo pipefail
out=${OUT:-.}
# MODEL, DEV0/DEV1, INPUT_LEN/OUTPUT_LEN/VOCAB override the defaults (a CPU dry run of the script itself).
model=${MODEL:-$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import dummy_model_dir; print(dummy_model_dir('qwen3-30b-a3b'))")}
dev0=${DEV0:-cuda:0}; dev1=${DEV1:-cuda:1}; input_len=${INPUT_LEN:-1024}; output_len=${OUTPUT_LEN:-128}
common=(--load-format dummy --skip-tokenizer-init --max-model-len ${MAX_MODEL_LEN:-4096} --served-model-name m
        --disable-uvicorn-access-log --host 127.0.0.1 "$@")
export ELASTIC_DATA_PARALLEL_KEY=$(python3 -c "import secrets; print(secrets.token_hex(16))")
pids=()
stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; for p in "${pids[@]}"; do
  timeout 60 tail --pid="$p" -f /dev/null 2>/dev/null || kill -KILL "$p" 2>/dev/null; done; pids=(); }
trap stop_all EXIT

wait_ready() {  # port log
  for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a process exited; log:"; tail -30 "$2"; return 1; }; done
    sleep 1
  done
  echo "not ready after 240 s"; tail -30 "$2"; return 1
}

bench() {  # name port
  for conc in 16 64; do
    timeout 150 python3 benchmarks/serve.py --base-url "http://127.0.0.1:$2" --vocab-size ${VOCAB:-151936} \
        --num-prompts $((conc * 4)) --input-len $input_len --output-len $output_len --max-concurrency $conc \
        --no-progress \
        --result-json "$out/headless_$1_c$conc.json" > "$out/headless_$1_c$conc.txt" 2>&1 \
      || echo "$1 at concurrency $conc failed (see headless_$1_c$conc.txt)"
  done
}

# A. one server, two local ranks
python3 -m elastic serve "$model" "${common[@]}" --port 8021 -dp 2 --device "${dev0%%:*}" \
    > "$out/headless_single.log" 2>&1 &
pids+=($!)
wait_ready 8021 "$out/headless_single.log" && bench single 8021
stop_all

# B. head (rank 0) + headless node (rank 1) over TCP
rpc=$((20000 + RANDOM % 10000))
topology=(-dp 2 --data-parallel-size-local 1 --data-parallel-address 127.0.0.1 --data-parallel-rpc-port $rpc)
python3 -m elastic serve "$model" "${common[@]}" --port 8022 "${topology[@]}" --device "$dev0" \
    > "$out/headless_head.log" 2>&1 &
pids+=($!)
python3 -m elastic serve "$model" "${common[@]}" --headless "${topology[@]}" --data-parallel-start-rank 1 \
    --device "$dev1" > "$out/headless_node.log" 2>&1 &
pids+=($!)
wait_ready 8022 "$out/headless_head.log" && bench split 8022
grep -h "runs rank\|refused\|failed" "$out/headless_head.log" | head -5
stop_all

python3 - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"\n{'setup':<34}{'conc':>5}{'out tok/s':>11}{'req/s':>8}{'TTFT p50 ms':>13}{'TPOT p50 ms':>13}{'failed':>8}")
for name, label in (("single", "one server, -dp 2 (ipc)"), ("split", "head + headless node (tcp+CURVE)")):
    for conc in (16, 64):
        f = out / f"headless_{name}_c{conc}.json"
        if not f.exists():
            print(f"{label:<34}{conc:>5}{'failed':>11}")
            continue
        s = json.loads(f.read_text())
        print(f"{label:<34}{conc:>5}{s['output_throughput']:>11.1f}{s['request_throughput']:>8.2f}"
              f"{s.get('median_ttft_ms', float('nan')):>13.1f}{s.get('median_tpot_ms', float('nan')):>13.2f}{s['failed']:>8}")
EOF
