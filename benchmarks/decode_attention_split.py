"""Decode attention from a CUDA graph against the bound the graph was captured with (one GPU).

    python benchmarks/decode_attention_split.py

A decode graph is captured for the model's longest context (`max_seq_len`), then replays whatever lengths the
batch has. This times paged attention at Qwen3-30B-A3B's dims (32 query / 4 KV heads of 128) and MLA at
DeepSeek-V2-Lite's (16 heads, latent 512 + rope 64) with 1 024-token contexts, for graphs sized for 1 134,
4 096 and the models' own context lengths, and prints µs per layer and the KV GB/s they reach.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from gpu_check_deepseek import _inputs  # noqa: E402
from mla_decode_tune import graph_us  # noqa: E402

from elastic.kernels import mla_attention, paged_attention  # noqa: E402


def attention_inputs(batch: int, ctx: int, hq: int = 32, hkv: int = 4, d: int = 128, block_size: int = 16):
    g = torch.Generator(device="cuda").manual_seed(batch)
    blocks = -(-ctx // block_size)
    tables = (torch.randperm(batch * blocks, device="cuda", generator=g).view(batch, blocks) + 1).int()
    k = torch.randn(batch * blocks + 1, block_size, hkv, d, device="cuda", generator=g).bfloat16()
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, d, device="cuda", generator=g).bfloat16()
    qsl = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    return q, k, v, tables, qsl, torch.full((batch,), ctx, device="cuda", dtype=torch.int32)


def main() -> None:
    ctx = 1024
    print(f"{torch.cuda.get_device_name()}, context {ctx}: us per layer (KV GB/s)")
    print(f"{'kernel':<10} {'graph bound':>11} {'batch 1':>16} {'batch 16':>16} {'batch 64':>16}")
    for name, bounds in (("attention", (1134, 4096, 40960)), ("mla", (1134, 4096, 163840))):
        for bound in bounds:
            cells = []
            for batch in (1, 16, 64):
                if name == "attention":
                    q, k, v, tables, qsl, lens = attention_inputs(batch, ctx)
                    us = graph_us(lambda: paged_attention(q, k, v, tables, qsl, lens, 128 ** -0.5, 1, bound))[0]
                    kv_bytes = batch * ctx * 4 * 128 * 2 * 2
                else:
                    args = (*_inputs(batch, ctx, 1, 16, 512, 64), 192 ** -0.5, 1, bound)
                    us = graph_us(lambda: mla_attention(*args))[0]
                    kv_bytes = batch * ctx * 576 * 2
                cells.append(f"{us:7.1f} ({kv_bytes / us / 1e3:5.0f})")
            print(f"{name:<10} {bound:>11} " + " ".join(f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
