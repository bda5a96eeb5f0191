"""Host time against device time of an eager forward (no CUDA graph), on one GPU, for a real model shape with
dummy weights: is a prefill step bound by the device or by the host launching its kernels?

    python benchmarks/eager_host.py --shape qwen3-30b-a3b --tokens 1024,32 --profile

For each step shape (one prompt of N tokens, or N one-token decodes at --context): the host's time to launch
the forward (the call returns before the device finishes unless something synchronizes), the whole forward
with a synchronize, and the device's time alone (CUDA events around the same launches, measured after a
synchronize so the device never waits for the host... except when the host is the bottleneck, which the first
two numbers show). --profile: the Python functions that take the host's time (cProfile, by own time).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import dummy_model_dir  # noqa: E402

from elastic import LLM, SamplingParams  # noqa: E402
from elastic.protocol.to_engine import EngineCoreRequest  # noqa: E402


def step_inputs(engine, tokens: int, context: int, tag: str):  # noqa: ANN001, ANN201
    """A scheduled step: one `tokens`-token prompt, or (`tokens` <= 256) that many decodes at `context`."""
    vocab = engine.config.model.arch.vocab_size
    if tokens > 256:
        engine.add_request(EngineCoreRequest(f"{tag}-p", [i % vocab for i in range(7, 7 + tokens)],
                                             SamplingParams(max_tokens=1)))
    else:
        for i in range(tokens):
            engine.add_request(EngineCoreRequest(f"{tag}-{i}", [(i * 31 + j) % vocab for j in range(context)],
                                                 SamplingParams(max_tokens=2, ignore_eos=True)))
        engine.step()  # their prompts; the next schedule holds one decode each
    return engine.scheduler.schedule()


def time_forward(runner, out, repeats: int) -> tuple[float, float, float]:  # noqa: ANN001
    """-> median (launch ms, launch + synchronize ms, device ms) of an eager forward."""
    input_ids, positions, md, _ = runner._prepare(out)
    launch, total, device = [], [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        runner._forward(input_ids, positions, md)
        end.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        launch.append((t1 - t0) * 1e3)
        total.append((t2 - t0) * 1e3)
        device.append(start.elapsed_time(end))
    return statistics.median(launch), statistics.median(total), statistics.median(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1024,32", help="step shapes: >256 one prompt, else that many decodes")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    path = dummy_model_dir(args.shape)
    llm = LLM(str(path), load_format="dummy", skip_tokenizer_init=True, max_model_len=4096, enforce_eager=True)
    engine = llm.engine
    for tokens in (int(t) for t in args.tokens.split(",")):
        out = step_inputs(engine, tokens, args.context, f"t{tokens}")
        launch, total, device = time_forward(engine.runner, out, args.repeats)
        print(f"{tokens:>5} tokens ({'prefill' if tokens > 256 else 'decodes'}): launch {launch:.2f} ms, "
              f"launch + sync {total:.2f} ms, device {device:.2f} ms", flush=True)
        if args.profile:
            input_ids, positions, md, _ = engine.runner._prepare(out)
            prof = cProfile.Profile()
            prof.enable()
            engine.runner._forward(input_ids, positions, md)
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        engine.abort_requests(list(engine.scheduler.requests))


if __name__ == "__main__":
    main()
