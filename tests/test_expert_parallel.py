"""Data + expert parallelism in-process groups (gloo): DP ranks in lockstep give single-rank outputs."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import threading
import traceback

import pytest
import torch
from conftest import random_prompts

from elastic import LLM, SamplingParams
from elastic.config import create_engine_config
from elastic.distributed.group import StatelessGroup, create_store
from elastic.engine.core import EngineCore
from elastic.protocol.to_engine import EngineCoreRequest

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
TIMEOUT = 120


def _run_rank(rank: int, world: int, port: int, path: str, mode: str, redundant: int,
              prompts: list[list[int]], results: mp.Queue) -> None:
    try:
        config = create_engine_config(path, max_model_len=128, data_parallel_size=world, ep_dispatch=mode,
                                      num_redundant_experts=redundant, device="cpu")
        parallel = dataclasses.replace(config.parallel.for_rank(rank), store_port=port)
        engine = EngineCore(dataclasses.replace(config, parallel=parallel))
        for i, p in enumerate(prompts):
            engine.add_request(EngineCoreRequest(f"{rank}-{i}", p, GREEDY))
        engine.start_wave()
        tokens: dict[str, list[int]] = {}
        steps = 0
        while engine.global_unfinished:
            for o in engine.step():
                tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            steps += 1
        engine.shutdown()
        results.put((rank, tokens, steps))
    except BaseException:
        results.put((rank, traceback.format_exc(), 0))


def run_data_parallel(path: str, world: int, mode: str, prompts_per_rank: list[list[list[int]]],
                      redundant: int = 0) -> tuple[dict[str, list[int]], list[int]]:
    store = create_store("127.0.0.1", 0, is_master=True)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_run_rank, args=(r, world, store.port, path, mode, redundant,
                                                 prompts_per_rank[r], results), daemon=True)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        merged: dict[str, list[int]] = {}
        steps = [0] * world
        for _ in range(world):
            rank, tokens, n = results.get(timeout=TIMEOUT)
            assert isinstance(tokens, dict), f"rank {rank} failed:\n{tokens}"
            merged.update(tokens)
            steps[rank] = n
        return merged, steps
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


@pytest.fixture(scope="module")
def reference(checkpoint_dir):
    """Single-rank greedy outputs for the prompts used below, per family."""
    cache = {}

    def get(family: str) -> tuple[str, list[list[int]], list[list[int]]]:
        if family not in cache:
            path = str(checkpoint_dir(family))
            prompts = random_prompts((4, 9, 15, 22, 31), seed=11)
            llm = LLM(path, max_model_len=128)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
            cache[family] = (path, prompts, [o.outputs[0].token_ids for o in outs])
        return cache[family]

    return get


@pytest.mark.parametrize("family, world, mode, redundant", [
    ("qwen3_moe", 2, "alltoall", 0),
    ("qwen3_moe", 2, "p2p", 0),         # no peer-mapped memory on the CPU: all-gather over gloo
    ("qwen2_moe", 2, "alltoall", 0),
    ("qwen2_moe", 3, "allgather", 1),   # 8 experts + 1 replica = 3 slots per rank
    ("mixtral", 3, "alltoall", 1),
])
def test_data_parallel_greedy_equals_single_rank(reference, family, world, mode, redundant):
    path, prompts, expected = reference(family)
    # Uneven split, and the last rank gets nothing: it must step with dummy batches.
    split = [prompts[:3], prompts[3:]] + [[]] * (world - 2) if world > 2 else [prompts[:1], prompts[1:]]
    tokens, steps = run_data_parallel(path, world, mode, split, redundant)
    flat = [f"{r}-{i}" for r, part in enumerate(split) for i in range(len(part))]
    assert [tokens[rid] for rid in flat] == expected
    assert len(set(steps)) == 1  # lockstep: every rank ran the same number of steps


def _recreate_worker(rank: int, port: int, sizes: list[int], results: mp.Queue) -> None:
    try:
        store = create_store("127.0.0.1", port, is_master=False)
        counts = []
        for gen, size in enumerate(sizes):
            if rank < size:
                g = StatelessGroup(store, f"test/{gen}", rank, size, "gloo")
                t = torch.tensor([float(rank + 1)])
                g.all_reduce(t)
                assert t.item() == size * (size + 1) / 2
                out = g.all_to_all(torch.arange(size, dtype=torch.float32) + 100 * rank, [1] * size, [1] * size)
                assert out.tolist() == [100.0 * r + rank for r in range(size)]
                g.destroy()
            counts.append((len(os.listdir(f"/proc/{os.getpid()}/fd")), threading.active_count()))
        results.put((rank, counts))
    except BaseException:
        results.put((rank, traceback.format_exc()))


def test_groups_recreate_2_3_2_without_leaks():
    sizes = [2, 3, 2, 3, 2]
    store = create_store("127.0.0.1", 0, is_master=True)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_recreate_worker, args=(r, store.port, sizes, results), daemon=True)
             for r in range(3)]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            rank, counts = results.get(timeout=TIMEOUT)
            assert isinstance(counts, list), f"rank {rank} failed:\n{counts}"
            # Same fds and threads after the 2nd cycle as after the 1st: nothing accumulates.
            assert counts[2] == counts[4], counts
            assert counts[1] == counts[3], counts
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
