"""Offline throughput of `LLM.generate`: N random token-id prompts of a fixed input/output length.

    python benchmarks/offline.py --num-prompts 64 --input-len 128 --output-len 64            # demo model, CPU
    python benchmarks/offline.py --shape qwen3-30b-a3b --device cuda --num-prompts 256 \\
        --input-len 1024 --output-len 256                                                     # dummy weights
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import SHAPES, dummy_model_dir  # noqa: E402

from elastic import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory (default: the built-in demo model)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="a real model's shape with dummy weights")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()

    engine_args = dict(device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.input_len + args.output_len + 1, seed=args.seed)
    if args.shape:
        model, name = str(dummy_model_dir(args.shape)), args.shape
        engine_args.update(load_format="dummy", skip_tokenizer_init=True)
    else:
        model, name = args.model, args.model or "demo"
    t0 = time.perf_counter()
    llm = LLM(model, **engine_args)
    load_s = time.perf_counter() - t0
    vocab = llm.config.model.arch.vocab_size
    rng = random.Random(args.seed)
    prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.input_len)]}
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = dict(model=name, device=str(llm.config.torch_device), dtype=str(llm.config.model.dtype),
                  num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                  load_s=round(load_s, 2), elapsed_s=round(elapsed, 3),
                  requests_per_s=round(args.num_prompts / elapsed, 3),
                  output_tokens_per_s=round(out_tokens / elapsed, 1),
                  total_tokens_per_s=round((out_tokens + args.num_prompts * args.input_len) / elapsed, 1),
                  kv_blocks=llm.engine.num_kv_blocks, preemptions=llm.engine.scheduler.num_preemptions)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
