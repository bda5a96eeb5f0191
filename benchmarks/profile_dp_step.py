"""Where a data-parallel decode step spends its time: torch.profiler over a few lockstep steps on rank 0.

    python benchmarks/profile_dp_step.py --world 2 --batches 1,64 --mode p2p
    python benchmarks/profile_dp_step.py --world 2 --mode p2p --batches 64 --prefill 1024   # + a prefill step
    python benchmarks/profile_dp_step.py --world 2 --mode p2p --batches 1 --prefill 1024 --beside 0,32
    python benchmarks/profile_dp_step.py --world 1 --shape deepseek-v2-lite --batches 64
    python benchmarks/profile_dp_step.py --world 2 --mode p2p --batches 1 --lone   # rank 0 alone decodes

A model shape with dummy weights, one engine core per GPU stepping in lockstep (as the engine processes of
the server do). Prints the per-step wall time and the top operators by self CPU and CUDA time. --prefill N
also profiles one step in which rank 0 alone prefills an N-token prompt and the other ranks idle (the
time to first token of a request that arrives at a quiet server) or, with --beside B, decode B requests each
(a busy server). --lone gives rank 0 the batch and lets the other ranks step along idle (a lone request).

Each decode profile ends with rank 0's kernels by name, per step: what each kernel adds to the step's GPU time,
from its end back to the end of the kernel before it (with programmatic dependent launch a kernel's CTAs start
while the one ahead still runs and wait, so its start says little), and the gaps where no kernel ran.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from decode_dp import idle_along  # noqa: E402
from shapes import dummy_model_dir  # noqa: E402

from elastic.config import create_engine_config  # noqa: E402
from elastic.distributed.group import create_store  # noqa: E402
from elastic.sampling_params import SamplingParams  # noqa: E402


def rank_main(rank: int, world: int, port: int, path: str, batches: list[int], mode: str, steps: int,
              prefill: int, beside: list[int], lone: bool) -> None:
    torch.cuda.set_device(rank)
    from elastic.engine.core import EngineCore

    config = create_engine_config(path, device="cuda", data_parallel_size=world, load_format="dummy",
                                  skip_tokenizer_init=True, max_model_len=2048, ep_dispatch=mode)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, device=f"cuda:{rank}"),
                                 parallel=dataclasses.replace(config.parallel.for_rank(rank), store_port=port))
    engine = EngineCore(config)
    for others in beside if prefill else []:
        profile_prefill(engine, rank, world, prefill, others)
    for batch in batches:
        if lone and rank != 0:
            idle_along(engine, rank)  # (decode_dp.py's)
        else:
            profile_batch(engine, rank, world, batch, mode, steps, lone)
    engine.shutdown()



def profile_prefill(engine, rank: int, world: int, length: int, beside: int) -> None:  # noqa: ANN001
    """Rank 0 prefills one `length`-token prompt (twice: compile, then profile); the other ranks idle along,
    or decode `beside` requests each (in flight before the prefill arrives)."""
    from elastic.protocol.to_engine import EngineCoreRequest

    vocab = engine.config.model.arch.vocab_size
    for attempt in ("warm-up", "profiled"):
        if rank != 0 and beside:
            rng = random.Random(f"{attempt}-{rank}-{beside}")
            for i in range(beside):
                engine.add_request(EngineCoreRequest(f"beside-{attempt}-{i}", [rng.randrange(vocab) for _ in range(length)],
                                                     SamplingParams(max_tokens=32, ignore_eos=True)))
        engine.start_wave()
        for _ in range(8 if beside else 0):  # the others' prompts in, their decoding under way
            engine.step()
        if rank == 0:
            rng = random.Random(f"{attempt}-{beside}")  # (a prompt seen before would hit the prefix cache)
            prompt = [rng.randrange(vocab) for _ in range(length)]
            engine.add_request(EngineCoreRequest(f"prefill-{attempt}", prompt, SamplingParams(max_tokens=1)))
        engine.start_wave()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        while engine.global_unfinished:
            engine.step()
    if rank == 0:
        table = prof.key_averages()
        busy = sum(e.self_device_time_total for e in table
                   if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
        others = f"{beside} decoding on each other rank" if beside else "the others idle"
        print(f"DP={world} prefill of {length} tokens on rank 0 ({others}): step {elapsed * 1e3:.2f} ms "
              f"(profiled), GPU kernels {busy:.2f} ms", flush=True)
        print(table.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
        print(table.table(sort_by="self_cuda_time_total", row_limit=20), flush=True)
        print_barrier_waits(prof, engine.config.model.arch.num_layers)


def profile_batch(engine, rank: int, world: int, batch: int, mode: str, steps: int,  # noqa: ANN001
                  lone: bool = False) -> None:
    from elastic.protocol.to_engine import EngineCoreRequest

    rng = random.Random(rank)
    for i in range(batch):
        prompt = [rng.randrange(engine.config.model.arch.vocab_size) for _ in range(1024)]
        engine.add_request(EngineCoreRequest(f"{batch}-{rank}-{i}", prompt,
                                             SamplingParams(max_tokens=steps * 3, ignore_eos=True)))
    engine.start_wave()
    for _ in range(10):  # prefill and warm-up
        engine.step()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    profiled = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(profiled):
            engine.step()
        torch.cuda.synchronize()
    if rank == 0:
        table = prof.key_averages()
        busy = sum(e.self_device_time_total for e in table
                   if e.device_type == torch.autograd.DeviceType.CUDA) / profiled / 1e3
        what = f"{batch} on rank 0 alone" if lone else f"{batch}/rank"
        print(f"DP={world} {mode} batch {what}: median step {statistics.median(times) * 1e3:.2f} ms, "
              f"GPU kernels {busy:.2f} ms/step", flush=True)
        print(table.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
        print(table.table(sort_by="self_cuda_time_total", row_limit=30), flush=True)
        print_barrier_waits(prof, engine.config.model.arch.num_layers)
        print_kernel_timeline(prof, profiled)
    engine.abort_requests(list(engine.scheduler.requests))
    while engine.global_unfinished:
        engine.step()


def print_barrier_waits(prof, num_layers: int) -> None:  # noqa: ANN001
    """The exchange kernels' times by layer (they end in the barrier, so they hold its wait): a late start of
    one rank's step shows in the first layer's dispatch, an uneven split of work between ranks in every
    layer's."""
    for name in ("p2p_dispatch_kernel", "p2p_combine_push_kernel"):
        times = sorted((e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA and e.name == name)
        if len(times) < num_layers:
            continue
        us = [t for _, t in times][:len(times) // num_layers * num_layers]
        first = us[::num_layers]
        rest = sorted(t for i, t in enumerate(us) if i % num_layers)
        print(f"{name}: first layer of a step {statistics.mean(first):.1f} us (mean of {len(first)}), the others "
              f"median {statistics.median(rest):.1f} / p10 {rest[len(rest) // 10]:.1f} / p90 "
              f"{rest[len(rest) * 9 // 10]:.1f} / max {rest[-1]:.1f} us", flush=True)


def print_kernel_timeline(prof, steps: int) -> None:  # noqa: ANN001
    """rank 0's kernels by name: calls and µs per step, each kernel's share counted from the end of the kernel
    before it (or from its own start, after a gap), and the gaps where no kernel ran, per step."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    share: dict[str, float] = {}
    calls: dict[str, int] = {}
    gaps, last_end = 0.0, None
    for start, end, name in kernels:
        if last_end is not None and end <= last_end:  # ran wholly inside the one before (another stream)
            continue
        begin = start if last_end is None or start >= last_end else last_end
        if last_end is not None and start > last_end and start - last_end < 50:  # within a step, not between steps
            gaps += start - last_end
        share[name] = share.get(name, 0.0) + end - begin
        calls[name] = calls.get(name, 0) + 1
        last_end = end
    total = sum(share.values()) + gaps
    print(f"kernel timeline, per step: {total / steps:.1f} us ({gaps / steps:.1f} us of gaps under 50 us)", flush=True)
    for name, us in sorted(share.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {us / steps:9.1f} us  {calls[name] / steps:6.1f} calls  {us / calls[name]:7.2f} us/call  "
              f"{name[:90]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batches", default="8", help="tokens per rank, comma-separated (one model load)")
    ap.add_argument("--mode", default="allgather", choices=["p2p", "allgather", "alltoall"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--shape", default="qwen3-30b-a3b", help="a model shape of benchmarks/shapes.py")
    ap.add_argument("--prefill", type=int, default=0, help="also profile a prefill of this many tokens on rank 0")
    ap.add_argument("--beside", default="0", help="with --prefill: requests each other rank decodes meanwhile "
                                                  "(comma-separated: one profile each; 0: idle)")
    ap.add_argument("--lone", action="store_true", help="the batch on rank 0 only, the other ranks idle")
    args = ap.parse_args()
    store = create_store("127.0.0.1", 0, is_master=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(dummy_model_dir(args.shape, tmp))
        batches = [int(b) for b in args.batches.split(",")]
        mp.start_processes(rank_main, args=(args.world, store.port, path, batches, args.mode, args.steps, args.prefill,
                                                   [int(b) for b in args.beside.split(",")], args.lone),
                           nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
