"""Expert-parallel dispatch + combine per MoE layer, both paths, against the bytes-over-the-link floor.

    python benchmarks/ep_comm.py --world 2 --out ep_comm.json      # one process per GPU, NCCL
    python benchmarks/ep_comm.py --world 2 --check --tokens 1,7,64,300  # p2p's fused pair sums, real experts

Per rank: T tokens (1..256, or --tokens), hidden 2048 bf16, top-8 of 128 experts (uniform routing). The expert
compute is replaced by the identity so only communication is timed. The floor is the bytes a rank must
send to other ranks (dispatch + combine) over the per-rank bandwidth of a large NCCL all-to-all measured
in the same run. All-gather and p2p are also timed from a CUDA graph (as decode steps run them: 20 calls
per graph, no launch overhead); all-to-all cannot be captured (host sync).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elastic.distributed.expert_parallel import ExpertParallelComm  # noqa: E402
from elastic.distributed.group import StatelessGroup, create_store  # noqa: E402
from elastic.distributed.peer_exchange import ExchangeShape, PeerExchange  # noqa: E402
from elastic.forward_context import ForwardContext, set_forward_context  # noqa: E402
from elastic.layers.moe import Routing  # noqa: E402

HIDDEN, EXPERTS, TOP_K = 2048, 128, 8
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class IdentityExperts:
    """Stands in for FusedMoE: same slot layout, no expert math (communication only)."""

    def __init__(self, world: int, rank: int) -> None:
        self.slots_per_rank = EXPERTS // world
        self.first_slot = rank * self.slots_per_rank
        self._pairs: dict[int, torch.Tensor] = {}

    def compute_local(self, slots: object, hidden: torch.Tensor, weights: torch.Tensor,
                      physical: torch.Tensor) -> torch.Tensor:
        return hidden

    def compute_local_ids(self, slots: object, hidden: torch.Tensor, weights: torch.Tensor,
                          ids: torch.Tensor) -> torch.Tensor:
        return hidden

    def pairs_alignment(self, slots: object, num_rows: int) -> None:
        return None  # no experts to align for

    def compute_local_pairs(self, slots: object, hidden: torch.Tensor, weights: torch.Tensor,
                            ids: torch.Tensor, aligned: object = None) -> torch.Tensor:
        # What the fused MoE hands the p2p push (one row per (row, k) pair, summed as it is sent): a buffer of
        # that shape, made once per size (the experts' own output, not timed).
        rows = ids.numel()
        if rows not in self._pairs:
            self._pairs[rows] = torch.zeros(rows, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        return self._pairs[rows]


def time_cuda(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)  # microseconds


def time_graph(fn, calls: int = 20) -> float:
    """Microseconds per call of `fn` replayed from a CUDA graph holding `calls` of them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up on the capture stream
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    return time_cuda(graph.replay, iters=20) / calls


def check_pair_sums(group: StatelessGroup, exchange: PeerExchange, token_counts: list[int]) -> None:
    """With real bf16 experts (Qwen3-30B-A3B's expert shape, random weights): the p2p push summing each row's
    pair outputs as it sends them must give, bit for bit, what the experts' own sums sent as they are give;
    and match the all-gather path to bf16 rounding."""
    from elastic.layers.moe import FusedMoE

    rank, world, device = group.rank, group.world_size, exchange.buffer.device
    torch.manual_seed(rank)
    torch.set_default_dtype(torch.bfloat16)  # the layer's slots are made in the default dtype
    with torch.device(device):
        moe = FusedMoE(EXPERTS, TOP_K, HIDDEN, 768, renormalize=True, ep_size=world, ep_rank=rank)
    torch.set_default_dtype(torch.float32)
    moe.live.w13.normal_(std=0.02)
    moe.live.w2.normal_(std=0.02)
    p2p, allgather = ExpertParallelComm(group, "p2p", exchange), ExpertParallelComm(group, "allgather")
    fused_sum = moe.compute_local_pairs
    for tokens in token_counts:
        hidden = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, device=device)
        physical = torch.rand(tokens, EXPERTS, device=device).topk(TOP_K, dim=-1).indices
        weights = torch.rand(tokens, TOP_K, device=device)
        with set_forward_context(ForwardContext(attn=None, dp_num_tokens=[tokens] * world)):
            fused = p2p(moe, moe.live, hidden, Routing(weights, physical)).clone()
            moe.compute_local_pairs = lambda *args: None  # the experts' own sums, sent as they are
            unfused = p2p(moe, moe.live, hidden, Routing(weights, physical)).clone()
            moe.compute_local_pairs = fused_sum
            gathered = allgather(moe, moe.live, hidden, Routing(weights, physical))
        torch.cuda.synchronize()
        equal = torch.equal(fused, unfused)
        close = torch.allclose(fused.float(), gathered.float(), rtol=2e-2, atol=2e-3)
        print(f"rank {rank} tokens {tokens}: pair sums bit-equal to the experts' sums: {equal}; "
              f"close to all-gather: {close}", flush=True)
        if not (equal and close):
            raise SystemExit(f"rank {rank}: the fused pair sums differ at {tokens} tokens")
    if rank == 0:
        print_barrier_ptx()


def print_barrier_ptx() -> None:
    """The memory operations the barrier compiles to (atom / red / ld.acquire / fence), from the PTX of the
    dispatch kernel as compiled in this process."""
    from elastic.kernels.ep_p2p_triton import p2p_dispatch_kernel

    try:
        compiled = [k for cache in p2p_dispatch_kernel.device_caches.values() for k in cache[0].values()]
        ptx = compiled[0].asm["ptx"]
    except Exception as e:  # the cache's layout is Triton's own business
        print(f"(no PTX: {e!r})")
        return
    ops = [line.strip() for line in ptx.splitlines()
           if any(op in line for op in ("atom.", "red.", "fence.", "membar", ".acquire", ".release"))]
    print("dispatch kernel, barrier operations in PTX:", *ops, sep="\n  ")


def time_paths(group: StatelessGroup, exchange: PeerExchange | None, token_counts: list[int],
               link_bps: float) -> list[dict]:
    """Per token count: each path's µs per layer (eagerly and, where it can be captured, from a CUDA graph; p2p
    also without its barriers) and the link floors of all-to-all and all-gather."""
    rank, world, device = group.rank, group.world_size, group.device
    moe = IdentityExperts(world, rank)
    gen = torch.Generator(device=device).manual_seed(rank)
    rows = []
    for tokens in token_counts:
        hidden = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, device=device, generator=gen)
        physical = torch.rand(tokens, EXPERTS, device=device, generator=gen).topk(TOP_K, dim=-1).indices
        weights = torch.rand(tokens, TOP_K, device=device, generator=gen)
        remote = float((physical // moe.slots_per_rank != rank).float().sum())  # pairs leaving this rank
        result = {"tokens_per_rank": tokens}
        for mode in ("alltoall", "allgather", "p2p"):
            comm = ExpertParallelComm(group, mode, exchange if mode == "p2p" else None)
            with set_forward_context(ForwardContext(attn=None, dp_num_tokens=[tokens] * world)):
                result[f"{mode}_us"] = time_cuda(lambda: comm(moe, moe, hidden, Routing(weights, physical)))
                if mode != "alltoall":
                    result[f"{mode}_graph_us"] = time_graph(lambda: comm(moe, moe, hidden, Routing(weights, physical)))
            if mode == "p2p":  # the same kernels without their barriers: what the barriers cost
                with set_forward_context(ForwardContext(attn=None, dp_num_tokens=[tokens] * world,
                                                        stand_in_collectives=True)):
                    routing = Routing(weights, physical)
                    result["p2p_no_barrier_graph_us"] = time_graph(lambda: comm(moe, moe, hidden, routing))
        # alltoall sends each remote (token, k) pair's hidden row out and its result back
        a2a_bytes = 2 * remote * HIDDEN * 2
        # allgather sends this rank's rows to every other rank, reduce-scatter sends the others' sums back
        ag_bytes = 2 * (world - 1) * tokens * HIDDEN * 2
        result["alltoall_floor_us"] = a2a_bytes / link_bps * 1e6
        result["allgather_floor_us"] = ag_bytes / link_bps * 1e6
        rows.append(result)
    return rows


def print_report(report: dict) -> None:
    print(f"{report['gpu']} x{report['world']}: 256 MiB all-to-all {report['big_all_to_all_us']:.0f} us -> "
          f"{report['link_gbs_per_rank']:.0f} GB/s per rank")
    print("per layer, dispatch + combine, us (graph: replayed from a CUDA graph, as decode steps run)")
    print(f"{'tok/rank':>8} {'a2a':>7} {'a2a floor':>9} {'ag':>7} {'ag graph':>8} {'p2p':>7} {'p2p graph':>9} "
          f"{'no barrier':>10} {'ag floor':>8}")
    for r in report["rows"]:
        print(f"{r['tokens_per_rank']:>8} {r['alltoall_us']:7.1f} {r['alltoall_floor_us']:9.1f} "
              f"{r['allgather_us']:7.1f} {r['allgather_graph_us']:8.1f} {r['p2p_us']:7.1f} "
              f"{r['p2p_graph_us']:9.1f} {r['p2p_no_barrier_graph_us']:10.1f} {r['allgather_floor_us']:8.1f}")


def worker(rank: int, world: int, port: int, out_path: str | None, token_counts: list[int], check: bool,
           max_programs: int | None) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    store = create_store("127.0.0.1", port, is_master=False)
    group = StatelessGroup(store, "ep-bench", rank, world, "nccl", device)
    if max_programs:
        from elastic.kernels import ep_p2p

        ep_p2p._MAX_PROGRAMS = max_programs  # programs per destination rank (rows loop beyond)
    exchange = PeerExchange.over_group(group, ExchangeShape(world, max(token_counts), HIDDEN, TOP_K, torch.bfloat16))
    if check:
        check_pair_sums(group, exchange, token_counts)
        group.barrier()
        group.destroy()
        return
    # Link bandwidth as NCCL sees it: a 256 MiB all-to-all, bytes each rank sends to others per second.
    big = torch.empty(128 << 20, dtype=torch.bfloat16, device=device)
    split = [big.shape[0] // world] * world
    a2a_us = time_cuda(lambda: group.all_to_all(big, split, split), iters=10)
    link_bps = big.numel() * 2 * (world - 1) / world / (a2a_us * 1e-6)
    rows = time_paths(group, exchange, token_counts, link_bps)
    group.barrier()
    if rank == 0:
        report = dict(gpu=torch.cuda.get_device_name(device), world=world, date=time.strftime("%Y-%m-%d"),
                      hidden=HIDDEN, experts=EXPERTS, top_k=TOP_K, link_gbs_per_rank=link_bps / 1e9,
                      big_all_to_all_us=a2a_us, rows=rows)
        print_report(report)
        if out_path:
            Path(out_path).write_text(json.dumps(report, indent=1))
    group.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=torch.cuda.device_count())
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                    help="tokens per rank to time, comma-separated (prefill chunks: e.g. 1024,8192)")
    ap.add_argument("--check", action="store_true",
                    help="instead of timing: real bf16 experts, p2p's fused pair sums against the unfused path")
    ap.add_argument("--max-programs", type=int, default=None,
                    help="p2p programs per destination rank (default: kernels/ep_p2p.py's)")
    args = ap.parse_args()
    if args.world < 2:
        raise SystemExit("needs at least 2 GPUs")
    store = create_store("127.0.0.1", 0, is_master=True)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    token_counts = [int(t) for t in args.tokens.split(",")]
    mp.start_processes(worker, args=(args.world, store.port, args.out, token_counts, args.check, args.max_programs),
                       nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
