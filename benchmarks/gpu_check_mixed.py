"""GPU check of the mixed-step CUDA graphs (one GPU; run on the device machine):

1. the prefill attention kernel driven by a tile map (a mixed-step graph's fixed grid, padded to a bucket
   with unused programs, requests and query rows) is bit-equal to its per-request grid, Qwen3-30B-A3B's heads;
2. one mixed step (three prompt chunks and decodes) replayed through its graph against the same step eager:
   hidden states' largest difference and the greedy next tokens;
3. greedy generations of every family's tiny bf16 checkpoint with mixed-step graphs and without
   (--no-mixed-step-graphs), many prompts, a small step budget so that prompts are chunked beside decodes.

    python benchmarks/gpu_check_mixed.py --out $OUT/mixed_check.json
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from checkpoints import family_names, make_checkpoint  # noqa: E402

from elastic import LLM, SamplingParams  # noqa: E402
from elastic.forward_context import ForwardContext, set_forward_context  # noqa: E402
from elastic.kernels.attention import paged_attention, prefill_tile_map, prefill_tile_queries  # noqa: E402


def check_kernel() -> bool:
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, bs = 32, 4, 128, 16
    q_lens, seq_lens = [1000, 1, 1, 37, 5], [1000, 900, 50, 300, 5]
    blocks = [-(-s // bs) for s in seq_lens]
    perm = torch.randperm(sum(blocks) + 8, generator=g)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[used:used + n]
        used += n
    dev = torch.device("cuda")
    kc = torch.randn(len(perm), bs, hkv, d, generator=g).to(dev, torch.bfloat16)
    vc = torch.randn(len(perm), bs, hkv, d, generator=g).to(dev, torch.bfloat16)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    T, bucket, max_seqs = int(qsl[-1]), 2048, 256
    q = torch.randn(bucket, hq, d, generator=g).to(dev, torch.bfloat16)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    want = paged_attention(q[:T], kc, vc, tables.to(dev), qsl.to(dev), sl.to(dev), d ** -0.5, max(q_lens), max(seq_lens))
    pad = max_seqs - len(q_lens)
    qsl_pad = torch.cat([qsl, torch.full((pad,), T, dtype=torch.int32)])
    tile = prefill_tile_queries(hq, hkv)
    tile_map = torch.from_numpy(prefill_tile_map(qsl_pad.numpy(), tile, -(-bucket // tile) + max_seqs)).to(dev)
    got = paged_attention(q, kc, vc, torch.cat([tables, torch.zeros(pad, tables.shape[1], dtype=torch.int32)]).to(dev),
                          qsl_pad.to(dev), torch.cat([sl, torch.zeros(pad, dtype=torch.int32)]).to(dev), d ** -0.5,
                          bucket, 4096, tile_map=tile_map)
    equal = bool(torch.equal(got[:T], want))
    print(f"tile-map prefill attention bit-equal to the per-request grid: {equal}", flush=True)
    return equal


def check_step(path: Path) -> dict:
    """One mixed step through its graph against eager: hidden states, greedy next tokens."""
    llm = LLM(str(path), dtype="bfloat16", max_model_len=512)
    engine, runner = llm.engine, llm.engine.runner
    rng = random.Random(1)
    vocab = engine.config.model.arch.vocab_size
    for i, n in enumerate((40, 3, 120, 7)):
        engine.add_request(_request(f"a{i}", [rng.randrange(vocab) for _ in range(n)], 8))
    for _ in range(3):
        engine.step()  # some decoding
    for i, n in enumerate((33, 90, 5)):
        engine.add_request(_request(f"b{i}", [rng.randrange(vocab) for _ in range(n)], 8))
    out = engine.scheduler.schedule()
    input_ids, positions, md, rows = runner._prepare(out)
    with torch.inference_mode():
        graph = runner._forward(input_ids, positions, md).clone()
        with set_forward_context(ForwardContext(attn=md)):
            eager = runner.model(input_ids, positions)
        same_tokens = bool(torch.equal(runner.model.compute_logits(graph[rows]).argmax(-1),
                                       runner.model.compute_logits(eager[rows]).argmax(-1)))
    key = runner.graphs.choose(len(input_ids), md.max_query_len == 1)
    result = {"tokens": len(input_ids), "graph": list(key), "max_abs_diff": float((graph - eager).abs().max()),
              "max_abs": float(eager.abs().max()), "same_next_tokens": same_tokens}
    print(f"mixed step through {tuple(key)} vs eager: {result}", flush=True)
    llm.engine.shutdown()
    del llm, engine, runner
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _request(rid: str, prompt: list[int], max_tokens: int):  # noqa: ANN202
    from elastic.protocol.to_engine import EngineCoreRequest

    return EngineCoreRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


def generate(path: Path, prompts: list[list[int]], mixed: bool) -> list[list[int]]:
    llm = LLM(str(path), dtype="bfloat16", max_model_len=512, max_num_batched_tokens=96, mixed_step_graphs=mixed)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    llm.engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    args = ap.parse_args()
    result: dict = {"device": torch.cuda.get_device_name(), "kernel_bit_equal": check_kernel(), "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for family in family_names():
            path = Path(tmp) / family
            make_checkpoint(family, path)
            if family == "qwen3_moe":
                result["step"] = check_step(path)
            rng = random.Random(0)
            prompts = [[rng.randrange(100, 1000) for _ in range(n)] for n in (5, 17, 40, 77, 120, 200, 9, 33)]
            with_graphs, without = generate(path, prompts, True), generate(path, prompts, False)
            same = sum(a == b for a, b in zip(with_graphs, without))
            prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(with_graphs, without)]
            result["families"][family] = {"identical": same, "of": len(prompts), "mean_common_prefix": sum(prefix) / len(prefix)}
            print(f"{family}: {same}/{len(prompts)} greedy generations identical with and without mixed-step graphs "
                  f"(mean common prefix {sum(prefix) / len(prefix):.1f} of 24)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
