"""GPU checks of DeepSeek-V2/V3 serving (device machine): the CUDA paths (bf16 and fp32) against the CPU fp32 path on
tiny random checkpoints of both families, then the MLA Triton kernels in bf16 against their torch reference at
DeepSeek-V2-Lite (16 heads) and V3 (128 heads) dims, decode captured in a CUDA graph, and decode kernel timing.

    python benchmarks/gpu_check_deepseek.py --out $OUT/deepseek_check.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from checkpoints import DEEPSEEK_FAMILIES  # noqa: E402
from gpu_check_engine import compare_family, print_families  # noqa: E402

from elastic.kernels import mla_attention, mla_attention_reference, store_latent, store_latent_reference  # noqa: E402

# name: (batch, context, query tokens per request, heads, kv_lora_rank, rope dim)
KERNEL_CASES = {
    "v2lite_decode_b64": (64, 1024, 1, 16, 512, 64),
    "v2lite_decode_b1_long": (1, 8000, 1, 16, 512, 64),
    "v3_decode_b16": (16, 700, 1, 128, 512, 64),
    "v2lite_prefill": (4, 300, 300, 16, 512, 64),
    "v2lite_chunked": (3, 500, 77, 16, 512, 64),
}


def _inputs(B: int, ctx: int, q_len: int, H: int, C: int, R: int, block_size: int = 16):
    g = torch.Generator(device="cuda").manual_seed(B * 7919 + ctx)
    blocks = -(-ctx // block_size)
    num_blocks = B * blocks + 1
    tables = torch.randperm(num_blocks - 1, device="cuda", generator=g)[:B * blocks].view(B, blocks).int() + 1
    cache = torch.randn(num_blocks, block_size, C + R, device="cuda", generator=g).bfloat16()
    T = B * q_len
    q_lat = (torch.randn(T, H, C, device="cuda", generator=g) / C ** 0.25).bfloat16()
    q_pe = torch.randn(T, H, R, device="cuda", generator=g).bfloat16()
    qsl = torch.arange(0, T + 1, q_len, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    return q_lat, q_pe, cache, tables, qsl, seq_lens


def check_kernel(name: str) -> dict:
    B, ctx, q_len, H, C, R = KERNEL_CASES[name]
    q_lat, q_pe, cache, tables, qsl, sl = _inputs(B, ctx, q_len, H, C, R)
    scale = 192 ** -0.5
    args = (q_lat, q_pe, cache, tables, qsl, sl, scale, q_len, ctx)
    got = mla_attention(*args).float()
    ref = mla_attention_reference(*args).float()
    row = dict(case=name, max_abs_err=float((got - ref).abs().max()), rel_err=float((got - ref).norm() / ref.norm()))
    if q_len == 1:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on the default stream
        with torch.cuda.stream(stream):  # warm up and capture off the default stream, as cuda_graphs does
            mla_attention(*args)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                captured = mla_attention(*args)
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
        row["graph_equal"] = bool(torch.equal(captured.float(), got))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            graph.replay()
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        us = start.elapsed_time(end) / 20 * 1e3
        row.update(us=us, latent_gbs=B * ctx * (C + R) * 2 / (us * 1e-6) / 1e9)
    return row


def check_store() -> dict:
    T, C, R = 4096, 512, 64
    latent = torch.randn(T, C + R, device="cuda").bfloat16()
    slots = torch.randperm(T * 2, device="cuda")[:T]
    slots[::7] = -1
    cache = torch.zeros(T * 2 // 16, 16, C + R, device="cuda", dtype=torch.bfloat16)
    ref = cache.clone()
    store_latent(latent[:, :C], latent[:, C:], cache, slots)
    store_latent_reference(latent[:, :C], latent[:, C:], ref, slots)
    return dict(case="store_latent", exact=bool(torch.equal(cache, ref)))


def check_routing() -> dict:
    """V3's router (256 experts, 8 groups, top-4 groups, top-8) through the Triton kernels vs the references."""
    from elastic.kernels.routing import grouped_topk, grouped_topk_reference, ids_to_slots, ids_to_slots_reference

    g = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(512, 256, device="cuda", generator=g) * 2
    bias = torch.randn(256, device="cuda", generator=g) * 0.3
    args = (logits, 8, True, "sigmoid", bias, 8, 4, "top2_sum", 2.5)
    (w, ids), (rw, rids) = grouped_topk(*args), grouped_topk_reference(*args)
    same_ids = torch.equal(ids.sort(dim=1)[0], rids.sort(dim=1)[0])
    weight_err = float((w.sort(dim=1)[0] - rw.sort(dim=1)[0]).abs().max())
    l2p = torch.stack([torch.arange(256), torch.arange(256) + 256], dim=1).cuda()   # two replicas each
    counts = torch.full((256,), 2, device="cuda")
    loads = [torch.zeros(512, dtype=torch.long, device="cuda") for _ in range(2)]
    got = ids_to_slots(ids, l2p, counts, loads[0], 128, 128)
    ref = ids_to_slots_reference(ids, l2p, counts, loads[1], 128, 128)
    slots_equal = all(torch.equal(a, b) for a, b in zip(got + (loads[0],), ref + (loads[1],)))
    return dict(case="grouped_routing_v3", exact=same_ids and weight_err < 1e-5 and slots_equal)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--skip-families", action="store_true")
    args = ap.parse_args()
    result: dict = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "families": [],
                    "kernels": []}
    if not args.skip_families:
        with tempfile.TemporaryDirectory() as tmp:
            for family in DEEPSEEK_FAMILIES:  # tiny V2 has 128 positions: prompts + 32 new tokens fit
                result["families"] += compare_family(family, Path(tmp), lengths=(5, 17, 40, 77, 90), max_model_len=128)
                print(json.dumps(result["families"][-2:]), flush=True)
    result["kernels"].append(check_store())
    result["kernels"].append(check_routing())
    for name in KERNEL_CASES:
        result["kernels"].append(check_kernel(name))
        print(json.dumps(result["kernels"][-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print_families(result["families"])
    print(f"\n{'kernel case':<24} {'rel err':>9} {'graph=':>7} {'us':>8} {'latent GB/s':>12}")
    for r in result["kernels"]:
        if "exact" in r:
            print(f"{r['case']:<24} {'exact' if r['exact'] else 'MISMATCH':>9}")
            continue
        print(f"{r['case']:<24} {r['rel_err']:9.2e} {str(r.get('graph_equal', '-')):>7} "
              f"{r.get('us', float('nan')):8.1f} {r.get('latent_gbs', float('nan')):12.0f}")


if __name__ == "__main__":
    main()
