"""The fused-MoE configuration a lone request's decode step meets under DP=2: one rank's 64 of Qwen3-30B-A3B's 128
experts over 2 rows (the real token's, and the idle rank's padding row that routes nowhere), against the 2 real
rows of one request on each rank (the same CUDA graph serves both). Times every small-batch candidate for both,
then writes a table for 64 slots where bucket 2 takes the candidate best for the sum of the two cases and every
other bucket the heuristic's configuration (what a missing table gives).

    PYTHONPATH=$PWD python benchmarks/tune_lone.py --tune-dir kernels/configs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from moe_kernel import (candidates, load_kernels, make_sets, make_weights, prepare, shape_of, submodule,  # noqa: E402
                        time_gemm)


def with_padding_row(sets: list) -> list:
    """Each routing set plus one row that routes nowhere (ids -1, weight 0), as an idle rank's padding row."""
    out = []
    for x, ids, w in sets:
        out.append((torch.cat([x, torch.zeros_like(x[:1])]), torch.cat([ids, torch.full_like(ids[:1], -1)]),
                    torch.cat([w, torch.zeros_like(w[:1])])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ek = load_kernels()
    mt, cfg = submodule(ek, "moe_triton"), submodule(ek, "moe_config")
    H, S, K, I = shape_of("qwen3-30b-a3b", 2)
    w13, w2 = make_weights(H, S, I)
    cases = {"lone": with_padding_row(make_sets(1, H, S, K, 8, ep=2)), "both": make_sets(2, H, S, K, 8, ep=2)}
    cases = {name: prepare(mt, sets, w13, K, 16) for name, sets in cases.items()}
    best, rows = {}, []
    extra = [{"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 1, "num_warps": 4, "num_stages": st}
             for n, k, st in ((16, 512, 3), (32, 512, 3), (16, 256, 4), (32, 128, 5))]  # narrower, deeper tiles
    for kind in ("up", "down"):
        for g in candidates(16, kind) + extra:
            try:
                times = {name: time_gemm(mt, kind, prep, w13, w2, K, 16, g) * 1e3 for name, prep in cases.items()}
            except Exception:  # (out of shared memory)
                continue
            rows.append(dict(kind=kind, config=g, **times))
            print(f"{kind:4s} lone {times['lone']:6.1f} us  both {times['both']:6.1f} us  {json.dumps(g)}", flush=True)
            total = times["lone"] + times["both"]
            if kind not in best or total < best[kind][0]:
                best[kind] = (total, g)
    heuristic = cfg.heuristic_config(2, K, S)
    for kind in ("up", "down"):
        h = next(r for r in rows if r["kind"] == kind and r["config"] == heuristic[kind])
        print(f"{kind}: heuristic lone {h['lone']:.1f} both {h['both']:.1f} us; chosen {json.dumps(best[kind][1])}")
    table = {str(t): cfg.heuristic_config(t, K, S) for t in [2 ** i for i in range(15)]}
    table["2"] = {"BLOCK_M": 16, "up": best["up"][1], "down": best["down"][1]}
    path = args.tune_dir / cfg.config_file_name(S, I, cfg.device_name_for(torch.device("cuda")), torch.bfloat16)
    path.write_text("{\n" + ",\n".join(f' "{k}": {json.dumps(v)}' for k, v in table.items()) + "\n}\n")
    print(f"wrote {path}")
    if args.out:
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
