"""Decode step time against the memory-bandwidth floor, for a real model shape with dummy weights.

    python benchmarks/decode.py --shape qwen3-30b-a3b --batch-sizes 1,8,64,128 --context 1024

The floor of one decode step is the bytes it must read over the copy bandwidth measured in the same run:
non-expert weights (lm_head included, embedding rows excluded) + the distinct experts the step's tokens
touch (counted per layer from the router's choices) + the KV cache read by attention.

With --data-parallel-size N > 1 (or --device cpu) it runs N engine cores in lockstep, one per GPU, as the
engine processes of the server do (benchmarks/decode_dp.py):

    python benchmarks/decode.py --shape qwen3-30b-a3b --data-parallel-size 2 --batch-sizes 1,16,64,128
    python benchmarks/decode.py --data-parallel-size 2 --batch-sizes 64 --lone-batch-sizes 1   # + a lone request
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import SHAPES, dummy_model_dir  # noqa: E402

from elastic import LLM, SamplingParams  # noqa: E402
from elastic.layers.moe import FusedMoE  # noqa: E402
from elastic.protocol.to_engine import EngineCoreRequest  # noqa: E402


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes read by every step outside the experts, bytes of one expert)."""
    expert_bytes, fixed = 0, 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        if name.endswith("experts.w13") or name.endswith("experts.w2"):
            expert_bytes += p[0].numel() * p.element_size()
        else:
            fixed += p.numel() * p.element_size()
    num_moe = sum(isinstance(m, FusedMoE) for m in model.modules())
    return fixed, expert_bytes // max(num_moe, 1)


def expanded_kv_bytes_per_token(arch, elem: int) -> int:
    """Bytes per token of a K/V cache without compression: MLA expanded to per-head K (nope + rope dims) and V."""
    if arch.mla is None:
        return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * elem
    return arch.num_layers * arch.num_heads * (arch.mla.qk_head_dim + arch.mla.v_head_dim) * elem


def time_decode_steps(engine, bs: int, context: int, steps: int, rng: random.Random) -> tuple[float, int] | None:
    """Median decode step time at batch `bs` (prompts of `context` tokens prefilled first) and the expert
    slots one step touches over all layers; None when the KV cache cannot hold the whole batch."""
    arch, moe_layers = engine.config.model.arch, engine.runner.model.moe_layers()
    ids = [f"b{bs}-{i}" for i in range(bs)]
    for rid in ids:
        prompt = [rng.randrange(arch.vocab_size) for _ in range(context)]
        engine.add_request(EngineCoreRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=steps + 8 + bs,
                                                                         ignore_eos=True)))
    started: set[str] = set()
    while len(started) < bs:  # prefill everything first
        started.update(o.request_id for o in engine.step())
    for _ in range(3):  # warm-up decode steps
        engine.step()
    running = len(engine.scheduler.running)
    if running < bs:  # the KV cache cannot hold them all: the row would time a smaller batch
        print(f"batch {bs}: only {running} requests fit in the KV cache ({engine.num_kv_blocks} blocks); skipped",
              flush=True)
        engine.abort_requests(ids)
        return None
    before = [m.expert_load.clone() for m in moe_layers]
    engine.step()
    touched = sum(int(((m.expert_load - b) > 0).sum()) for m, b in zip(moe_layers, before))
    times = []
    pipelined = engine.pipeline is not None
    for _ in range(steps):
        if not pipelined:  # (a pipelined step() returns with the next step on its way: steps back to back)
            torch.cuda.synchronize(engine.runner.device)
        t0 = time.perf_counter()
        engine.step()  # ends with a step's sampled tokens on the host
        times.append(time.perf_counter() - t0)
    engine.abort_requests(ids)
    return statistics.median(times), touched


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--batch-sizes", default="1,8,64,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="pipelined decode (default: the engine's, on with CUDA)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--model-dir", type=Path, help="a local checkpoint (its weights) instead of --shape")
    ap.add_argument("--data-parallel-size", type=int, default=1, help="engine cores in lockstep, one per GPU")
    # No choices here: the engine config validates (modes are being added in elastic/distributed/).
    ap.add_argument("--ep-dispatch", default="auto", help="the engine's ep_dispatch (auto, alltoall, ...)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (gloo ranks: a smoke check, not a number)")
    ap.add_argument("--lone-batch-sizes", default="",
                    help="with data parallelism, also these batches on rank 0 alone, the other ranks idle (1: a lone "
                         "request on a quiet server)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.model_dir is not None:
        args.shape = args.model_dir.name
    if args.data_parallel_size > 1 or args.device != "cuda":
        from decode_dp import run_data_parallel

        run_data_parallel(args, batch_sizes)
        return
    device = torch.device("cuda")
    model_dir, load_format = (args.model_dir, "auto") if args.model_dir else (dummy_model_dir(args.shape), "dummy")
    llm = LLM(str(model_dir), load_format=load_format, device="cuda", skip_tokenizer_init=True,
              # room for what early requests decode while later ones prefill: none finishes while timed
              max_model_len=args.context + args.steps + 16 + max(batch_sizes), max_num_seqs=max(batch_sizes),
              enforce_eager=args.enforce_eager, ep_dispatch=args.ep_dispatch, async_scheduling=args.async_scheduling)
    engine, model = llm.engine, llm.engine.runner.model
    arch = llm.config.model.arch
    bandwidth = copy_bandwidth(device)
    fixed, per_expert = weight_bytes(model)
    runner = engine.runner
    kv_per_token = runner.kv_bytes_per_block() // runner.block_size  # what the cache stores (MLA: the latent row)
    kv_expanded = expanded_kv_bytes_per_token(arch, llm.config.model.dtype.itemsize)
    rng = random.Random(0)
    rows = []
    for bs in batch_sizes:
        timed = time_decode_steps(engine, bs, args.context, args.steps, rng)
        if timed is None:
            continue
        step, touched = timed
        kv_bytes = bs * (args.context + 6 + args.steps // 2) * kv_per_token
        floor_bytes = fixed + touched * per_expert + kv_bytes
        floor = floor_bytes / bandwidth
        rows.append(dict(batch=bs, step_ms=step * 1e3, floor_ms=floor * 1e3, ratio=step / floor,
                         experts_touched_per_layer=touched / len(model.moe_layers()), floor_gb=floor_bytes / 1e9,
                         tokens_per_s=bs / step))
        print(json.dumps(rows[-1]), flush=True)
    result = dict(shape=args.shape, gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                  context=args.context, cuda_graphs=not args.enforce_eager,
                  async_scheduling=llm.config.scheduler.async_scheduling,
                  bandwidth_gbs=bandwidth / 1e9,
                  kv_bytes_per_token=kv_per_token, kv_bytes_per_token_expanded=kv_expanded,
                  kv_tokens=engine.num_kv_blocks * runner.block_size, rows=rows)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print_report(result, args.shape)


def print_report(result: dict, shape: str) -> None:
    kv_per_token, kv_expanded = result["kv_bytes_per_token"], result["kv_bytes_per_token_expanded"]
    print(f"\n{shape} on {result['gpu']}, context {result['context']}, copy bandwidth "
          f"{result['bandwidth_gbs']:.0f} GB/s, CUDA graphs {'on' if result['cuda_graphs'] else 'off'}"
          f"{', async scheduling' if result.get('async_scheduling') else ''}")
    print(f"KV cache: {kv_per_token / 1024:.1f} KiB per token ({kv_expanded / 1024:.1f} KiB expanded, "
          f"{kv_expanded / kv_per_token:.1f}x), {result['kv_tokens']} tokens fit")
    print(f"{'batch':>5} {'step ms':>8} {'floor ms':>9} {'x floor':>8} {'experts/layer':>14} {'tok/s':>8}")
    for r in result["rows"]:
        print(f"{r['batch']:>5} {r['step_ms']:8.2f} {r['floor_ms']:9.2f} {r['ratio']:8.2f} "
              f"{r['experts_touched_per_layer']:14.1f} {r['tokens_per_s']:8.0f}")

if __name__ == "__main__":
    main()
