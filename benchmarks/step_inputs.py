"""Host time to build a step's inputs (ModelRunner._prepare), which the GPU waits for between steps.

    python benchmarks/step_inputs.py

Synthetic requests (random block tables, block size 16) on the CPU: decode steps of 64 and 256 requests
with 1k and 8k contexts, and a prefill step of 8 x 1 024 tokens. Prints µs per call (median of 5 x 100).
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elastic.executor.model_runner import ModelRunner  # noqa: E402
from elastic.request import SchedulerOutput  # noqa: E402

BLOCK_SIZE = 16


def step(rng: random.Random, requests: int, context: int, new_tokens: int) -> SchedulerOutput:
    scheduled = []
    for _ in range(requests):
        total = context + new_tokens
        req = SimpleNamespace(num_computed_tokens=context, all_token_ids=[rng.randrange(1000) for _ in range(total)],
                              block_table=rng.sample(range(1, 100_000), -(-total // BLOCK_SIZE)), num_tokens=total)
        scheduled.append((req, new_tokens))
    return SchedulerOutput(scheduled)


def main() -> None:
    rng = random.Random(0)
    runner = ModelRunner.__new__(ModelRunner)  # no model: only what _prepare reads
    runner.block_size, runner.device = BLOCK_SIZE, torch.device("cpu")
    for name, shape in (("decode 64 x 1k", (64, 1024, 1)), ("decode 64 x 8k", (64, 8192, 1)),
                        ("decode 256 x 1k", (256, 1024, 1)), ("prefill 8 x 1024", (8, 0, 1024))):
        out = step(rng, *shape)
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(100):
                runner._prepare(out)
            runs.append((time.perf_counter() - t0) / 100 * 1e6)
        print(f"{name:<18} {statistics.median(runs):8.0f} us")


if __name__ == "__main__":
    main()
