"""GPU check of the engine (run on the device machine): CUDA vs the CPU fp32 path on tiny random
checkpoints of every family, then a Qwen3-30B-A3B-shaped dummy model end to end.

    python benchmarks/gpu_check_engine.py --out $OUT/engine_check.json
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from checkpoints import family_names, make_checkpoint  # noqa: E402
from shapes import dummy_model_dir  # noqa: E402

from elastic import LLM, SamplingParams  # noqa: E402

GREEDY_LEN = 32


def compare_family(family: str, root: Path, lengths: tuple[int, ...] = (5, 17, 40, 77, 120),
                   max_model_len: int = 512) -> list[dict]:
    path = str(make_checkpoint(family, root / family))
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 1000) for _ in range(n)] for n in lengths]
    greedy = SamplingParams(temperature=0, max_tokens=GREEDY_LEN, ignore_eos=True)
    cpu = LLM(path, device="cpu", dtype="float32", max_model_len=max_model_len)
    ref_logits = [cpu.engine.prompt_logits(p) for p in prompts]
    ref_tokens = [o.outputs[0].token_ids for o in cpu.generate([{"prompt_token_ids": p} for p in prompts], greedy,
                                                               use_tqdm=False)]
    rows = []
    for dtype in ("float32", "bfloat16"):
        gpu = LLM(path, device="cuda", dtype=dtype, max_model_len=max_model_len)
        logits = [gpu.engine.prompt_logits(p).float().cpu() for p in prompts]
        num = sum(float((a - b).norm() ** 2) for a, b in zip(logits, ref_logits)) ** 0.5
        den = sum(float(b.norm() ** 2) for b in ref_logits) ** 0.5
        top1 = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(logits, ref_logits)]).mean()
        tokens = [o.outputs[0].token_ids for o in gpu.generate([{"prompt_token_ids": p} for p in prompts], greedy,
                                                               use_tqdm=False)]
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), GREEDY_LEN)
                  for a, b in zip(tokens, ref_tokens)]
        row = dict(family=family, dtype=dtype, logit_rel_err=num / den, prefill_top1_agree=float(top1),
                   greedy_identical=sum(p == GREEDY_LEN for p in prefix) / len(prefix),
                   greedy_mean_matching_prefix=sum(prefix) / len(prefix))
        if gpu.engine.runner.graphs is not None:  # release and re-capture at run time: same outputs
            gpu.engine.runner.capture_cuda_graphs()
            again = [o.outputs[0].token_ids for o in gpu.generate([{"prompt_token_ids": p} for p in prompts],
                                                                  greedy, use_tqdm=False)]
            row["same_after_graph_recapture"] = again == tokens
        rows.append(row)
        gpu.shutdown()
        del gpu
        gc.collect()  # (the engine frees at once since session 9; a cycle added later must not fail this check)
        torch.cuda.empty_cache()
    return rows


def dummy_30b(root: Path, num_prompts: int, input_len: int, output_len: int) -> dict:
    t0 = time.perf_counter()
    llm = LLM(str(dummy_model_dir("qwen3-30b-a3b", root)), load_format="dummy", device="cuda",
              skip_tokenizer_init=True, max_model_len=input_len + output_len + 1)
    load_s = time.perf_counter() - t0
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(151936) for _ in range(input_len)]} for _ in range(num_prompts)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(model="qwen3-30b-a3b (dummy, bf16)", gpu=torch.cuda.get_device_name(), load_s=round(load_s, 1),
                kv_blocks=llm.engine.num_kv_blocks, num_prompts=num_prompts, input_len=input_len,
                output_len=output_len, elapsed_s=round(elapsed, 2),
                output_tokens_per_s=round(n_out / elapsed, 1),
                total_tokens_per_s=round((n_out + num_prompts * input_len) / elapsed, 1),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))


def print_families(rows: list[dict]) -> None:
    print(f"\n{'family':<12} {'dtype':<9} {'rel err':>9} {'top1':>6} {'greedy=':>8} {'prefix':>7} {'recapture':>9}")
    for r in rows:
        print(f"{r['family']:<12} {r['dtype']:<9} {r['logit_rel_err']:9.2e} {r['prefill_top1_agree']:6.3f} "
              f"{r['greedy_identical']:8.2f} {r['greedy_mean_matching_prefix']:7.1f} "
              f"{str(r.get('same_after_graph_recapture', '-')):>9}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--skip-30b", action="store_true")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    result: dict = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "families": []}
    with tempfile.TemporaryDirectory() as tmp:
        for family in family_names():
            result["families"] += compare_family(family, Path(tmp))
            print(json.dumps(result["families"][-2:]), flush=True)
        if not args.skip_30b:
            result["qwen3_30b_a3b"] = dummy_30b(Path(tmp), args.num_prompts, args.input_len, args.output_len)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print_families(result["families"])
    if "qwen3_30b_a3b" in result:
        print(json.dumps(result["qwen3_30b_a3b"], indent=1))


if __name__ == "__main__":
    main()
