"""A per-step trace for performance work: with ELASTIC_STEP_TRACE=DIR set in an engine's environment, every
step the engine agrees on (one per launched forward, pipelined or not) appends one JSON line to
DIR/steps-<pid>.jsonl:

    {"t": seconds (monotonic, the host's clock), "rank": DP rank, "epoch": layout epoch,
     "tokens": this rank's tokens, "decode": all of them decodes, "dp": every rank's tokens (null: one rank),
     "graph": the CUDA graph's size (null: eager; one rank: null, its engine picks the graph), "mixed": that
     graph is a mixed step's}

The time between a rank's consecutive lines is its step period (a launched decode step's device time while
pipelined, a whole step otherwise); lines of several ranks share one clock (one host). Lines are buffered and
written every 256 steps and at shutdown, so tracing costs a dict and a list append per step.
`benchmarks/step_trace_report.py` summarizes a directory of them.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

ENV = "ELASTIC_STEP_TRACE"
_FLUSH_EVERY = 256


class StepTrace:
    def __init__(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"steps-{os.getpid()}.jsonl"
        self.lines: list[bytes] = []
        self.encoder = msgspec.json.Encoder()

    @classmethod
    def from_env(cls) -> StepTrace | None:
        directory = os.environ.get(ENV)
        return cls(directory) if directory else None

    def record(self, rank: int, epoch: int, tokens: int, decode: bool, dp: list[int] | None,
               graph: tuple[int, bool] | None) -> None:
        self.lines.append(self.encoder.encode({
            "t": time.monotonic(), "rank": rank, "epoch": epoch, "tokens": tokens, "decode": decode, "dp": dp,
            "graph": graph[0] if graph is not None else None, "mixed": graph is not None and graph[1]}))
        if len(self.lines) >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            with self.path.open("ab") as f:
                f.write(b"\n".join(self.lines) + b"\n")
            self.lines = []
