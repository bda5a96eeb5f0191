set -uo pipefail
out=${OUT:-.}; mkdir -p "$out"; PART_PREFIX=ls_; TAIL=6
source benchmarks/parts.sh
part dp1 90 python3 benchmarks/decode.py --batch-sizes 1,64 --out "$out/ls_dp1.json"
for w in 4 1; do
  export ELASTIC_LL_WARPS=$w; part "dp2_w$w" 110 python3 benchmarks/decode.py --data-parallel-size 2 --ep-dispatch p2p --batch-sizes 1,64 --lone-batch-sizes 1 --out "$out/ls_dp2_w$w.json"
done
best=$(python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); best = (1e9, "4")
for w in ("4", "1"):
    try:
        rows = json.loads((out / f"ls_dp2_w{w}.json").read_text())["rows"]
        lone = [r["step_ms"] for r in rows if r.get("lone")][0]
        print(f"w{w}: " + ", ".join(f"b{r['batch']}{' lone' if r.get('lone') else ''} {r['step_ms']:.3f}" for r in rows), file=sys.stderr)
        best = min(best, (lone, w))
    except Exception as e:
        print(e, file=sys.stderr)
print(best[1])
PY
)
echo "LL dispatch warps chosen: $best"
export ELASTIC_LL_WARPS=$best
part ep_time 60 python3 benchmarks/ep_comm.py --world 2 --tokens 1,2,64,128 --out "$out/ls_ep_time.json"
part serve 420 env OUT="$out" bash benchmarks/gpu_serve_dp.sh
printf '%s\n' "${status[@]}"
python3 -c "import json; [print(k, ', '.join(f\"b{r['batch']}{' lone' if r.get('lone') else ''} {r['step_ms']:.3f}\" for r in json.load(open('$out/ls_'+k+'.json'))['rows'])) for k in ('dp1','dp2_w4','dp2_w1')]"
grep -vE "Warning|warn|^\s*$|CudaIPC" "$out/ls_ep_time.log" | tail -8
tail -12 "$out/ls_serve.log"
