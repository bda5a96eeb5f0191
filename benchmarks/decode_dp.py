"""decode.py with data parallelism: N engine cores, one per GPU (cuda:rank) or gloo ranks on CPU, in lockstep.

Each rank is built the way the launcher builds an engine process (cluster/launcher.py: the engine config
with this rank's ParallelConfig and device; engine/process.py: device and threads, then EngineCore), over a
TCPStore hosted by this parent process. Every rank adds `batch` requests, prefills, then times decode steps;
`EngineCore.step()` runs the per-step DP exchange, so every rank calls it the same number of times (loop
exits are agreed over a separate gloo group, outside the timed steps). A lone batch (--lone-batch-sizes) goes
to rank 0 only: the other ranks step as idle engine processes do, until rank 0's wave ends, and rank 0's steps
are the ones timed.

Reported per batch (requests per rank): the median over steps of the slowest rank's step time; the floor
of the rank with the largest one, (non-expert weights + this rank's LOCAL expert slots that any rank's
tokens touched + this rank's KV cache) / the copy bandwidth of its device; tokens/s over all ranks; and the
per-step DP exchange (ParallelState.exchange_step, a host gloo all-gather), timed by wrapping it in this
process only: its median over every rank's calls (waiting for the slowest rank included), and the median
over steps of the fastest rank's call (about the collective alone).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from decode import copy_bandwidth, expanded_kv_bytes_per_token, weight_bytes
from shapes import dummy_model_dir

from elastic.cluster.devices import rank_device
from elastic.config import EngineConfig, create_engine_config
from elastic.distributed.group import StatelessGroup, create_store
from elastic.engine.core import EngineCore
from elastic.engine.startup import set_device_and_threads
from elastic.protocol.to_engine import EngineCoreRequest
from elastic.sampling_params import SamplingParams

STORE_HOST = "127.0.0.1"


def device_bandwidth(device: torch.device) -> float:
    """Copy bandwidth (bytes read + written per second) of this rank's device; on CPU a wall-clock copy."""
    if device.type == "cuda":
        return copy_bandwidth(device)
    src = torch.rand(32 << 20)  # 128 MiB of float32
    dst = torch.empty_like(src)
    times = []
    for _ in range(8):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times[2:])


class ExchangeTimer:
    """Times this rank's `ParallelState.exchange_step` calls: an instance attribute shadows the method, so
    the engine itself is unchanged (the benchmark's only view into the exchange)."""

    def __init__(self, state: Any) -> None:
        self.times: list[float] = []
        self.calls = 0  # every step's exchange: equal on all ranks when they stepped in lockstep
        inner: Callable[..., Any] = state.exchange_step

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.times.append(time.perf_counter() - t0)
                self.calls += 1

        state.exchange_step = timed


def rank_config(base: EngineConfig, rank: int, port: int) -> EngineConfig:
    """The config the launcher hands engine `rank` (EngineLauncher._spawn): its ParallelConfig, the group
    store, and its own GPU."""
    parallel = dataclasses.replace(base.parallel.for_rank(rank), store_host=STORE_HOST, store_port=port)
    device = rank_device(base.device, rank, parallel.data_parallel_size)
    return dataclasses.replace(base, parallel=parallel, model=dataclasses.replace(base.model, device=device))


def all_true(group: StatelessGroup, flag: bool) -> bool:
    """Whether `flag` holds on every rank: loop exits must agree, or a rank would wait in a step alone."""
    return bool(group.all_reduce(torch.tensor([int(flag)]), dist.ReduceOp.MIN).item())


def time_rank(engine: EngineCore, bench: StatelessGroup, timer: ExchangeTimer | None, bs: int, context: int,
              steps: int, max_tokens: int, rng: random.Random, lone: bool = False) -> dict[str, Any] | None:
    """This rank's part of one batch size: per-step times, exchange times and the expert slots of every rank
    touched in one step; None (on every rank) when some rank's KV cache cannot hold its whole batch. `lone`:
    only rank 0 has the batch, the other ranks step along idle (`idle_along`) and take part in nothing else."""
    if lone and bench.rank != 0:
        return idle_along(engine, bench.rank)
    agree = (lambda flag: flag) if lone else (lambda flag: all_true(bench, flag))
    arch, moe_layers = engine.config.model.arch, engine.runner.model.moe_layers()
    rank, device = bench.rank, engine.runner.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    ids = [f"r{rank}-b{bs}-{i}" for i in range(bs)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for rid in ids:
        engine.add_request(EngineCoreRequest(rid, [rng.randrange(arch.vocab_size) for _ in range(context)], params))
    started: set[str] = set()
    while not agree(len(started) >= bs):  # prefill every rank's batch first
        started.update(o.request_id for o in engine.step())
    for _ in range(3):  # warm-up decode steps
        engine.step()
    if not agree(len(engine.scheduler.running) >= bs):
        if rank == 0:
            print(f"batch {bs}: some rank's KV cache ({engine.num_kv_blocks} blocks) cannot hold it; skipped",
                  flush=True)
        end_batch(engine, ids, lone)
        return None
    before = [m.expert_load.clone() for m in moe_layers]
    engine.step()
    # Slots hold experts; a rank computes its own slots for the tokens of every rank, so the loads (each rank
    # counts its own tokens' choices over all slots) are summed before counting each rank's touched slots.
    load = torch.stack([(m.expert_load - b).cpu() for m, b in zip(moe_layers, before)]) if moe_layers else None
    touched = [0] * bench.world_size
    if load is not None:
        if not lone:
            bench.all_reduce(load)
        spr = moe_layers[0].slots_per_rank
        touched = [int((load[:, r * spr:(r + 1) * spr] > 0).sum()) for r in range(bench.world_size)]
    if timer is not None:
        timer.times.clear()
    times = []
    pipelined = engine.pipeline is not None
    for _ in range(steps):
        if not pipelined:  # (a pipelined step() returns with the next step on its way: steps back to back)
            sync()
        t0 = time.perf_counter()
        engine.step()  # ends with a step's sampled tokens on the host
        times.append(time.perf_counter() - t0)
    held = agree(len(engine.scheduler.running) >= bs)  # no request finished while timed
    end_batch(engine, ids, lone)
    return dict(rank=rank, requests=bs, step_s=times, exchange_s=list(timer.times) if timer else [],
                touched=touched[rank], touched_by_rank=touched, held=held, exchanges=timer.calls if timer else None)


def idle_along(engine: EngineCore, rank: int) -> dict[str, Any]:
    """A rank without requests beside rank 0's lone batch: it runs the dummy steps an idle engine process runs,
    until rank 0's wave ends (its steps are not timed: rank 0's are the lone request's)."""
    engine.start_wave()
    while engine.global_unfinished:
        engine.step()
    return dict(rank=rank, requests=0, step_s=None, exchange_s=[], touched=None, held=True, exchanges=None)


def end_batch(engine: EngineCore, ids: list[str], lone: bool) -> None:
    engine.abort_requests(ids)
    while lone and engine.global_unfinished:  # the idle ranks step until the wave ends: end it with them
        engine.step()


def rank_main(rank: int, base: EngineConfig, port: int, batch_sizes: list[int], args: argparse.Namespace) -> None:
    """One DP rank (torch.multiprocessing target). Rank 0 gathers the rows over the store and reports."""
    config = rank_config(base, rank, port)
    set_device_and_threads(config)  # as engine/process.py: this rank's GPU, or its share of the CPU cores
    engine = EngineCore(config)
    world = config.parallel.data_parallel_size
    store = create_store(STORE_HOST, port, is_master=False)
    bench = StatelessGroup(store, "bench", rank, world, "gloo")  # the benchmark's own agreements, not the engine's
    timer = ExchangeTimer(engine.parallel) if engine.parallel is not None else None
    runner, model = engine.runner, engine.runner.model
    bandwidth = device_bandwidth(runner.device)
    fixed, per_expert = weight_bytes(model)
    kv_per_token = runner.kv_bytes_per_block() // runner.block_size
    num_moe = max(len(model.moe_layers()), 1)
    rng = random.Random(rank)
    max_tokens = config.model.max_model_len - args.context
    runs = [(bs, False) for bs in batch_sizes] + [(bs, True) for bs in lone_sizes(args)]
    for bs, lone in runs:
        part = time_rank(engine, bench, timer, bs, args.context, args.steps, max_tokens, rng, lone)
        if part is not None:
            kv_bytes = part["requests"] * (args.context + 6 + args.steps // 2) * kv_per_token
            part.update(bandwidth=bandwidth, fixed_bytes=fixed + kv_bytes, expert_bytes=per_expert)
        store.set(f"bench/rows/{bs}/{lone}/{rank}", json.dumps(part))
    bench.barrier()  # every rank's last collective is done before any group goes away
    if rank == 0:
        parts = {run: [json.loads(store.get(f"bench/rows/{run[0]}/{run[1]}/{r}")) for r in range(world)]
                 for run in runs}
        report(args, config, parts, num_moe, kv_per_token, engine.num_kv_blocks * runner.block_size)
    bench.destroy()
    engine.shutdown()


def combine(bs: int, parts: list[dict[str, Any]], num_moe: int) -> dict[str, Any]:
    for p in parts:
        if p["touched"] is None:  # an idle rank beside a lone batch: the slots rank 0's tokens touched there
            p["touched"] = parts[0]["touched_by_rank"][p["rank"]]
        p["floor_bytes"] = p["fixed_bytes"] + p["touched"] * p["expert_bytes"]
    timed = [p for p in parts if p["step_s"] is not None]  # (a lone batch: rank 0's steps)
    step_max = [max(p["step_s"][i] for p in timed) for i in range(len(timed[0]["step_s"]))]
    step = statistics.median(step_max)  # the median over steps of the slowest rank's step
    floors = [p["floor_bytes"] / p["bandwidth"] for p in parts]
    floor, worst = max(floors), parts[floors.index(max(floors))]
    exchange = [t for p in timed for t in p["exchange_s"]]
    fastest = [min(per_step) for per_step in zip(*(p["exchange_s"] for p in timed))]  # the least skew-waiting
    row = dict(batch=bs, step_ms=step * 1e3, floor_ms=floor * 1e3, ratio=step / floor,
               experts_touched_per_layer=statistics.mean(p["touched"] for p in parts) / num_moe,
               floor_gb=worst["floor_bytes"] / 1e9, tokens_per_s=sum(p["requests"] for p in parts) / step,
               exchange_us=statistics.median(exchange) * 1e6 if exchange else None,
               exchange_min_us=statistics.median(fastest) * 1e6 if fastest else None,
               rank_step_ms=[statistics.median(p["step_s"]) * 1e3 for p in timed],
               rank_floor_ms=[f * 1e3 for f in floors], batch_held=all(p["held"] for p in parts))
    if len({p["exchanges"] for p in timed}) != 1:
        raise RuntimeError(f"batch {bs}: ranks out of lockstep (exchanges per rank {[p['exchanges'] for p in parts]})")
    if not row["batch_held"]:
        print(f"batch {bs}: a request finished during the timed steps (the batch shrank)", flush=True)
    return row


def lone_sizes(args: argparse.Namespace) -> list[int]:
    return [int(b) for b in args.lone_batch_sizes.split(",") if b]


def report(args: argparse.Namespace, config: EngineConfig, parts: dict[tuple[int, bool], list[dict[str, Any] | None]],
           num_moe: int, kv_per_token: int, kv_tokens: int) -> None:
    rows = []
    for (bs, lone), ranks in parts.items():
        if all(p is not None for p in ranks):
            rows.append(dict(combine(bs, ranks, num_moe), lone=lone))  # type: ignore[arg-type]
            print(json.dumps(rows[-1]), flush=True)
    device = torch.device(config.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or '?'})"
    bandwidths = [p["bandwidth"] for ranks in parts.values() for p in ranks if p is not None]
    world = config.parallel.data_parallel_size
    kv_expanded = expanded_kv_bytes_per_token(config.model.arch, config.model.dtype.itemsize)
    result = dict(shape=args.shape, gpu=gpu, date=time.strftime("%Y-%m-%d"), context=args.context,
                  cuda_graphs=device.type == "cuda" and not args.enforce_eager, data_parallel_size=world,
                  ep_dispatch=config.parallel.ep_dispatch, ep_dispatch_requested=args.ep_dispatch,
                  async_scheduling=config.scheduler.async_scheduling,
                  bandwidth_gbs=min(bandwidths) / 1e9 if bandwidths else None, kv_bytes_per_token=kv_per_token,
                  kv_bytes_per_token_expanded=kv_expanded, kv_tokens=kv_tokens, rows=rows,
                  step_ms_is="median over steps of the slowest rank's step", floor_is="the largest rank floor")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    bw = f"{result['bandwidth_gbs']:.0f}" if bandwidths else "?"
    print(f"\n{args.shape} on {world} x {gpu}, context {args.context}, copy bandwidth {bw} GB/s (slowest rank), "
          f"CUDA graphs {'on' if result['cuda_graphs'] else 'off'}, ep_dispatch {result['ep_dispatch']}"
          f"{', async scheduling' if result['async_scheduling'] else ''}")
    print(f"KV cache: {kv_per_token / 1024:.1f} KiB per token ({kv_expanded / 1024:.1f} KiB expanded, "
          f"{kv_expanded / kv_per_token:.1f}x), {kv_tokens} tokens fit per rank")
    print("batch = requests per rank (lone: on rank 0 only, the others idle); step = median of the slowest rank's "
          "step; floor = the largest rank's; experts = local slots touched per layer (mean over ranks); exch = DP "
          "exchange (all / fastest rank)")
    print(f"{'batch':>7} {'step ms':>8} {'floor ms':>9} {'x floor':>8} {'experts/layer':>14} {'tok/s':>8} "
          f"{'exch us':>8} {'min us':>7}")
    for r in rows:
        ex = f"{r['exchange_us']:8.0f} {r['exchange_min_us']:7.0f}" if r["exchange_us"] is not None else \
            f"{'-':>8} {'-':>7}"
        batch = f"{r['batch']} lone" if r["lone"] else str(r["batch"])
        print(f"{batch:>7} {r['step_ms']:8.2f} {r['floor_ms']:9.2f} {r['ratio']:8.2f} "
              f"{r['experts_touched_per_layer']:14.1f} {r['tokens_per_s']:8.0f} {ex}")


def run_data_parallel(args: argparse.Namespace, batch_sizes: list[int]) -> None:
    """Validate the config here (a bad option fails once, before any rank starts), host the store, spawn
    the ranks and wait: if one fails, torch.multiprocessing ends the others and raises."""
    world = args.data_parallel_size
    if args.device.startswith("cuda") and torch.cuda.device_count() < world:
        raise SystemExit(f"--data-parallel-size {world} needs {world} GPUs; {torch.cuda.device_count()} visible")
    model_dir, load_format = (args.model_dir, "auto") if args.model_dir else (dummy_model_dir(args.shape), "dummy")
    # Decode tokens that early requests make while later ones prefill (chunks of the default token budget)
    # come on top of the timed steps: room for them, so no request finishes while timed.
    largest = max(batch_sizes + lone_sizes(args))
    prefill_steps = math.ceil(largest * args.context / max(8192, largest)) + 1
    base = create_engine_config(str(model_dir), load_format=load_format, device=args.device,
                                skip_tokenizer_init=True, data_parallel_size=world, ep_dispatch=args.ep_dispatch,
                                max_model_len=args.context + args.steps + 16 + prefill_steps,
                                max_num_seqs=largest, enforce_eager=args.enforce_eager,
                                async_scheduling=args.async_scheduling)
    store = create_store(STORE_HOST, 0, is_master=True)  # lives until every rank has exited
    mp.spawn(rank_main, args=(base, store.port, batch_sizes, args), nprocs=world, join=True)
    del store


if __name__ == "__main__":
    raise SystemExit("run benchmarks/decode.py --data-parallel-size N")
