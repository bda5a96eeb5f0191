"""benchmarks/decode.py at data_parallel_size 2 on CPU (gloo ranks, a tiny checkpoint): the ranks step in
lockstep, rank 0 reports every batch size with the DP exchange timed, and every process exits; --lone-batch-sizes
adds batches on rank 0 alone, the other rank stepping along idle."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "decode.py"


@pytest.mark.parametrize("pipelined", [False, True])
def test_decode_benchmark_data_parallel_on_cpu(checkpoint_dir, tmp_path: Path, pipelined: bool) -> None:
    out = tmp_path / "decode_dp.json"
    cmd = [sys.executable, str(SCRIPT), "--model-dir", str(checkpoint_dir("qwen3_moe")), "--device", "cpu",
           "--data-parallel-size", "2", "--batch-sizes", "1,4", "--context", "16", "--steps", "5",
           "--out", str(out)] + (["--async-scheduling", "--lone-batch-sizes", "1"] if pipelined else [])
    # A hang (a rank waiting alone in a collective) fails here instead of stalling the suite.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["data_parallel_size"] == 2 and result["ep_dispatch"] == "alltoall"  # auto on CPU
    assert result["async_scheduling"] is pipelined  # off by default on the CPU
    lone_rows = [(1, True)] if pipelined else []
    assert [(r["batch"], r["lone"]) for r in result["rows"]] == [(1, False), (4, False)] + lone_rows
    for row in result["rows"]:
        lone = row["lone"]
        assert row["batch_held"] and len(row["rank_step_ms"]) == (1 if lone else 2)  # (lone: rank 0's steps)
        assert len(row["rank_floor_ms"]) == 2
        assert row["step_ms"] > 0 and row["floor_ms"] > 0 and row["exchange_us"] > 0
        requests = row["batch"] if lone else 2 * row["batch"]
        assert row["tokens_per_s"] == pytest.approx(requests / (row["step_ms"] / 1e3))
    assert "exch us" in proc.stdout  # the table, printed once (by rank 0)
    assert proc.stdout.count("batch  step ms") == 1
