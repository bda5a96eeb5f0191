"""Data + expert parallelism on GPUs (NCCL), run on a multi-GPU device machine:

1. tiny random checkpoints: DP=2/EP=2 greedy output vs DP=1 on one GPU, fp32 (must be identical) and
   bf16 (agreement with the CPU fp32 path, compared with single-GPU bf16's), both dispatch paths;
2. a Qwen3-30B-A3B-shaped dummy model over DP=2: throughput of both dispatch paths.

    python benchmarks/gpu_check_dp.py --out dp.json

Each rank is an EngineCore in its own process (cuda:rank) stepping in lockstep, as in the engine-core
processes of the server, minus the sockets.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks"), str(ROOT)]

from checkpoints import make_checkpoint  # noqa: E402
from shapes import dummy_model_dir  # noqa: E402

from elastic.config import create_engine_config  # noqa: E402
from elastic.distributed.group import create_store  # noqa: E402
from elastic.sampling_params import SamplingParams  # noqa: E402


def rank_main(rank: int, world: int, port: int, path: str, engine_args: dict, prompts: list[list[int]],
              max_tokens: int, results) -> None:
    try:
        torch.cuda.set_device(rank)
        from elastic.engine.core import EngineCore
        from elastic.protocol.to_engine import EngineCoreRequest

        config = create_engine_config(path, device="cuda", data_parallel_size=world, **engine_args)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, device=f"cuda:{rank}"),
                                     parallel=dataclasses.replace(config.parallel.for_rank(rank), store_port=port))
        engine = EngineCore(config)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(EngineCoreRequest(f"{rank}-{i}", p, params))
        engine.start_wave()
        tokens: dict[str, list[int]] = {}
        torch.cuda.synchronize()
        start = time.perf_counter()
        while engine.global_unfinished:
            for o in engine.step():
                tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        torch.cuda.synchronize()
        results.put((rank, tokens, time.perf_counter() - start))
        engine.shutdown()
    except BaseException:
        results.put((rank, traceback.format_exc(), 0.0))


def run_dp(path: str, world: int, engine_args: dict, prompts: list[list[int]], max_tokens: int):
    store = create_store("127.0.0.1", 0, is_master=True)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    split = [prompts[r::world] for r in range(world)]
    procs = [ctx.Process(target=rank_main, args=(r, world, store.port, path, engine_args, split[r], max_tokens,
                                                 results)) for r in range(world)]
    for p in procs:
        p.start()
    merged, elapsed = {}, 0.0
    try:
        for _ in procs:
            rank, tokens, seconds = results.get(timeout=400)
            if not isinstance(tokens, dict):
                raise RuntimeError(f"rank {rank} failed:\n{tokens}")
            merged.update(tokens)
            elapsed = max(elapsed, seconds)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    ordered = [merged[f"{i % world}-{i // world}"] for i in range(len(prompts))]
    return ordered, elapsed


def single_gpu(path: str, engine_args: dict, prompts: list[list[int]], max_tokens: int, device: str = "cuda"):
    from elastic import LLM

    llm = LLM(path, device=device, **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    del llm  # this process shares GPU 0 with rank 0 of the DP runs: give its memory back
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs]


def llm_check(world: int) -> None:
    """`LLM(data_parallel_size=N)`: engine processes, ZMQ, coordinator waves, NCCL; fp32 must equal one GPU."""
    from elastic import LLM

    rng = random.Random(1)
    prompts = [[rng.randrange(10, 1000) for _ in range(n)] for n in (5, 17, 40, 77, 120, 9, 33, 61)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("qwen3_moe", "qwen2_moe"):
            path = str(make_checkpoint(family, Path(tmp) / family))
            one = single_gpu(path, dict(max_model_len=256, dtype="float32", kv_cache_memory=1 << 30), prompts, 24)
            for mode in ("alltoall", "allgather", "p2p"):
                llm = LLM(path, device="cuda", dtype="float32", max_model_len=256, kv_cache_memory=1 << 30,
                          data_parallel_size=world, ep_dispatch=mode)
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                same = [o.outputs[0].token_ids for o in outs] == one
                print(json.dumps(dict(check="LLM data_parallel_size", family=family, world=world, mode=mode,
                                      dtype="float32", identical_to_one_gpu=same)), flush=True)
                llm.shutdown()
                del llm
                gc.collect()


def matching_prefix(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), len(s)) for s, t in zip(a, b)) / len(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--skip-30b", action="store_true")
    ap.add_argument("--llm-only", action="store_true", help="only the LLM(data_parallel_size=N) check")
    ap.add_argument("--families", default="qwen3_moe,qwen2_moe")
    ap.add_argument("--modes", default="alltoall,allgather,p2p", help="dispatch paths of the tiny checks")
    args = ap.parse_args()
    if args.llm_only:
        return llm_check(args.world)
    world = args.world
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 1000) for _ in range(n)] for n in (5, 17, 40, 77, 120, 9)]
    report: dict = {"gpu": torch.cuda.get_device_name(0), "world": world, "date": time.strftime("%Y-%m-%d"),
                    "tiny": [], "dummy_30b": []}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            path = str(make_checkpoint(family, Path(tmp) / family))
            base = dict(max_model_len=256, kv_cache_memory=1 << 30)
            cpu_ref = single_gpu(path, dict(base, dtype="float32"), prompts, 24, device="cpu")
            for dtype in ("float32", "bfloat16"):
                one = single_gpu(path, dict(base, dtype=dtype), prompts, 24)
                for mode in args.modes.split(","):
                    dp, _ = run_dp(path, world, dict(base, dtype=dtype, ep_dispatch=mode), prompts, 24)
                    row = dict(family=family, dtype=dtype, mode=mode, identical_to_dp1=dp == one,
                               prefix_vs_dp1=matching_prefix(dp, one), prefix_vs_cpu_fp32=matching_prefix(dp, cpu_ref),
                               dp1_prefix_vs_cpu_fp32=matching_prefix(one, cpu_ref))
                    report["tiny"].append(row)
                    print(json.dumps(row), flush=True)
        if not args.skip_30b:
            path = str(dummy_model_dir("qwen3-30b-a3b", tmp))
            big = [[rng.randrange(151936) for _ in range(512)] for _ in range(64 * world)]
            for mode in ("allgather", "p2p"):
                engine_args = dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=1024, ep_dispatch=mode)
                tokens, seconds = run_dp(path, world, engine_args, big, 64)
                row = dict(mode=mode, requests=len(big), input_len=512, output_len=64, elapsed_s=seconds,
                           output_tokens_per_s=sum(map(len, tokens)) / seconds)
                report["dummy_30b"].append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{'family':<10} {'dtype':<9} {'mode':<9} {'==DP1':>6} {'pfx DP1':>8} {'pfx CPU':>8} {'DP1 pfx CPU':>11}")
    for r in report["tiny"]:
        print(f"{r['family']:<10} {r['dtype']:<9} {r['mode']:<9} {str(r['identical_to_dp1']):>6} "
              f"{r['prefix_vs_dp1']:8.1f} {r['prefix_vs_cpu_fp32']:8.1f} {r['dp1_prefix_vs_cpu_fp32']:11.1f}")
    for r in report["dummy_30b"]:
        print(f"qwen3-30b-a3b dummy DP={world} {r['mode']}: {r['requests']} x {r['input_len']}/{r['output_len']} "
              f"in {r['elapsed_s']:.1f}s, {r['output_tokens_per_s']:.0f} output tok/s")


if __name__ == "__main__":
    main()
