"""Host time against device time of a step's forward, eager and as a CUDA graph's replay, on one GPU, for a
real model shape with dummy weights: is a prefill step bound by the device or by the host launching kernels?

    python benchmarks/eager_host.py --shape qwen3-30b-a3b --tokens 1024,2048,32 --profile

For each step shape (one prompt of N tokens, or N one-token decodes at --context), eager and then through the
graph the engine picks (a mixed-step graph for prompts): the host's time to launch the forward (the call
returns before the device finishes unless something synchronizes), the whole forward with a synchronize, and
the device's time between CUDA events around it (when the host is the bottleneck the device waits for it, and
the three agree). --profile: the Python functions that take the eager forward's host time (cProfile).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import dummy_model_dir  # noqa: E402

from elastic import LLM, SamplingParams  # noqa: E402
from elastic.forward_context import ForwardContext, set_forward_context  # noqa: E402
from elastic.protocol.to_engine import EngineCoreRequest  # noqa: E402


def step_inputs(engine, tokens: int, context: int, tag: str):  # noqa: ANN001, ANN201
    """A scheduled step: one `tokens`-token prompt, or (`tokens` <= 256) that many decodes at `context`."""
    vocab = engine.config.model.arch.vocab_size
    if tokens > 256:
        engine.add_request(EngineCoreRequest(f"{tag}-p", [(i * 7 + len(tag)) % vocab for i in range(tokens)],
                                             SamplingParams(max_tokens=1)))
    else:
        for i in range(tokens):
            engine.add_request(EngineCoreRequest(f"{tag}-{i}", [(i * 31 + j) % vocab for j in range(context)],
                                                 SamplingParams(max_tokens=4, ignore_eos=True)))
        s = engine.scheduler
        while s.waiting or any(r.num_computed_tokens != r.num_tokens - 1 for r in s.running):
            engine.step()  # their prompts; then each schedule holds one decode each
    return engine.scheduler.schedule()


def time_forward(forward, repeats: int) -> tuple[float, float, float]:  # noqa: ANN001
    """-> median (launch ms, launch + synchronize ms, device ms) of `forward()`."""
    launch, total, device = [], [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        forward()
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
    ap.add_argument("--out", help="a JSON file for the rows")
    args = ap.parse_args()
    path = dummy_model_dir(args.shape)
    llm = LLM(str(path), load_format="dummy", skip_tokenizer_init=True, max_model_len=4096)
    engine, runner = llm.engine, llm.engine.runner
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        out = step_inputs(engine, tokens, args.context, f"t{tokens}")
        input_ids, positions, md, _ = runner._prepare(out)

        def eager() -> None:
            with torch.inference_mode(), set_forward_context(ForwardContext(attn=md)):
                runner.model(input_ids, positions)

        def graph() -> None:
            with torch.inference_mode():
                runner._forward(input_ids, positions, md)

        key = runner.graphs.choose(len(input_ids), md.max_query_len == 1) if runner.graphs is not None else None
        for name, forward in (("eager", eager), (f"graph {tuple(key) if key else None}", graph)):
            launch, total, device = time_forward(forward, args.repeats)
            rows.append({"tokens": tokens, "path": name, "launch_ms": launch, "total_ms": total, "device_ms": device})
            print(f"{tokens:>5} tokens ({'prefill' if tokens > 256 else 'decodes'}), {name}: launch {launch:.2f} ms, "
                  f"launch + sync {total:.2f} ms, device {device:.2f} ms", flush=True)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            eager()
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        engine.abort_requests(list(engine.scheduler.requests))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "shape": args.shape,
                                              "rows": rows}, indent=1))

if __name__ == "__main__":
    main()
