"""Pipelined decode (--async-scheduling) against stepping one step at a time, on a GPU: the same greedy tokens
and finish reasons for a real model shape with dummy weights (bf16, CUDA graphs), requests of mixed lengths.

    PYTHONPATH=$PWD python benchmarks/gpu_check_async.py --shape deepseek-v2-lite --out check_async.json

The two engines run one after the other in this process (the same dummy weights: the same seed).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import SHAPES, dummy_model_dir  # noqa: E402

from elastic import LLM, SamplingParams  # noqa: E402


def generate(shape: str, async_scheduling: bool, prompts: list[list[int]], max_tokens: list[int]) -> tuple[list, float]:
    llm = LLM(str(dummy_model_dir(shape)), load_format="dummy", device="cuda", skip_tokenizer_init=True,
              max_model_len=512, max_num_seqs=64, async_scheduling=async_scheduling)
    params = [SamplingParams(temperature=0, max_tokens=n) for n in max_tokens]
    started = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    result = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="deepseek-v2-lite", choices=sorted(SHAPES))
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 20000) for _ in range(rng.randrange(8, 200))] for _ in range(args.num_prompts)]
    max_tokens = [rng.choice([1, 2, 7, 33, 64, 128]) for _ in prompts]
    stepwise, t_step = generate(args.shape, False, prompts, max_tokens)
    pipelined, t_pipe = generate(args.shape, True, prompts, max_tokens)
    same = [a == b for a, b in zip(stepwise, pipelined)]
    result = dict(shape=args.shape, gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                  requests=len(prompts), identical=sum(same), tokens=sum(len(t) for t, _ in stepwise),
                  finish_reasons=sorted({r for _, r in stepwise}), stepwise_s=t_step, pipelined_s=t_pipe,
                  first_mismatch=next((i for i, s in enumerate(same) if not s), None))
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    sys.exit(0 if all(same) else 1)


if __name__ == "__main__":
    main()
