#!/usr/bin/env bash
# EPLB on GPUs (device machine, repo root): a Qwen3-30B-A3B-shaped dummy model with Zipf-skewed routing,
# served at DP=2 with EPLB on. Throughput at the initial placement, then a forced rebalance *while a load
# runs* (its time, the longest step stall, balancedness before/after), then throughput at the new placement:
# both measured in one run on one server, so the only difference is the placement.
# Results in ${OUT:-.}/eplb_*.json. Extra arguments go to `elastic serve`.
set -uo pipefail
out=${OUT:-.}
port=8012
key=eplb-bench
model=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import dummy_model_dir; print(dummy_model_dir('qwen3-30b-a3b'))")
python3 -m elastic serve "$model" --load-format dummy --skip-tokenizer-init --max-model-len 4096 \
    --port $port --host 127.0.0.1 --served-model-name qwen3-30b-a3b-dummy --disable-uvicorn-access-log \
    -dp 2 --enable-eplb --eplb-step-interval 100000000 --admin-api-key $key "$@" > "$out/eplb_server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 1 300); do
  curl -sf http://127.0.0.1:$port/health >/dev/null && break
  kill -0 $server 2>/dev/null || { tail -30 "$out/eplb_server.log"; exit 1; }
  sleep 1
done
load() {  # $1: result name
  python3 benchmarks/serve.py --base-url http://127.0.0.1:$port --vocab-size 151936 --num-prompts 256 \
      --input-len 1024 --output-len 128 --max-concurrency 64 --no-progress --result-json "$out/eplb_$1.json" \
      2>&1 | grep -E "throughput|TPOT|ITL" | head -8
}
echo "== warm-up"; load warmup > /dev/null
echo "== initial placement"; load before
curl -s http://127.0.0.1:$port/eplb > "$out/eplb_state_before.json"
echo "== rebalance under load"
load during > "$out/eplb_during.txt" &
loader=$!
sleep 8
curl -s -X POST -H "Authorization: Bearer $key" http://127.0.0.1:$port/eplb/rebalance > "$out/eplb_rebalance.json"
wait $loader; cat "$out/eplb_during.txt"
echo "== after rebalance"; load after
curl -s http://127.0.0.1:$port/metrics | grep "^elastic:eplb" > "$out/eplb_metrics.txt"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
r = json.load(open(f"{out}/eplb_rebalance.json"))
s = r["stats"]
b, a = (json.load(open(f"{out}/eplb_{k}.json")) for k in ("before", "after"))
print(f"rebalance: {r['seconds']:.2f}s wall, longest step stall {s['last_stall_s']*1e3:.1f} ms, "
      f"{s['slots_moved']} slots moved, {s['bytes_moved']/2**20:.0f} MiB received (rank 0), "
      f"balancedness {s['balancedness_before']:.3f} -> {s['balancedness']:.3f}")
print(f"output tok/s: before {b['output_throughput']:.0f}, after {a['output_throughput']:.0f} "
      f"({a['output_throughput']/b['output_throughput']:.3f}x); mean TPOT ms {b['mean_tpot_ms']:.1f} -> {a['mean_tpot_ms']:.1f}")
PY
