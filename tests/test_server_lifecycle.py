"""Server process lifecycle: start-up failures, 503 while starting, engine death, shutdown without leftovers.
Each test runs its own short-lived `elastic serve`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from checkpoints import make_checkpoint
from server_fixtures import REPO_ROOT, TEST_SERVER_ARGS, ServerProcess, wait_until


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("ckpt"))


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_missing_model_dir_is_a_usage_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "elastic", "serve", str(tmp_path / "nope"), "--device", "cpu"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "is not a local checkpoint directory" in out.stderr


def test_engine_startup_failure_exits_nonzero(checkpoint: Path, tmp_path: Path) -> None:
    """An engine that fails to start (here: unreadable weights) ends the server with exit 1, its error in the
    log, nothing left behind. Every start-up error of EngineCore takes this path; the KV-cache sizing one is
    checked in-process below rather than by a second server start."""
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with ServerProcess(model, *TEST_SERVER_ARGS) as server:
        try:
            code = server.proc.wait(120)
        except subprocess.TimeoutExpired:
            pytest.fail("the server hung after an engine start-up failure:\n" + server.log()[-3000:])
        log = server.log()
        assert code == 1, log[-3000:]
        assert "engine core 0 failed to start" in log and "cannot read" in log, log[-3000:]
        assert server.leftover_pids() == []
        assert server.socket_files() == []


def test_kv_cache_too_small_is_a_start_up_error(checkpoint: Path) -> None:
    """--kv-cache-memory 1KiB: the engine refuses to start (in the server, the path above)."""
    from elastic import LLM

    with pytest.raises(RuntimeError, match="not enough memory for the KV cache"):
        LLM(str(checkpoint), device="cpu", dtype="float32", max_model_len=256, kv_cache_memory=1024)


def test_starting_engine_death_and_shutdown(checkpoint: Path) -> None:
    # Without restarts a lone engine's death is final: the fail-fast path (docs/reliability.md has the rest).
    with ServerProcess(checkpoint, *TEST_SERVER_ARGS, "--served-model-name", "m",
                       "--no-restart-failed-ranks") as server:
        # Hold the engine in its start-up (it needs seconds just to import torch) to see the server starting.
        engine = server.engine_pid()
        os.kill(engine, signal.SIGSTOP)
        try:
            server.wait_listening()
            assert "starting" in _error(httpx.get(server.base_url + "/health"), 503)["message"]
            body = {"model": "m", "prompt": "hi", "max_tokens": 2}
            _error(server.post("/v1/completions", json=body), 503)
        finally:
            os.kill(engine, signal.SIGCONT)
        server.wait_ready()
        assert server.post("/v1/completions", json=body).status_code == 200

        # Requests in flight when the engine dies get an error promptly: streams an error event, others a 503.
        results: dict[str, object] = {}

        def stream(i: int) -> None:
            req = {"model": "m", "prompt": f"story {i}", "max_tokens": 240, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", server.base_url + "/v1/completions", json=req, timeout=60) as r:
                results[f"stream{i}"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        def plain() -> None:
            req = {"model": "m", "prompt": "essay", "max_tokens": 240, "ignore_eos": True}
            results["plain"] = server.post("/v1/completions", json=req)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)] + [threading.Thread(target=plain)]
        for t in threads:
            t.start()
        wait_until(lambda: server.metric("vllm:num_requests_running") == 4, 60, "4 running requests")
        killed_at = time.monotonic()
        os.kill(engine, signal.SIGKILL)
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "in-flight requests hung after the engine died"
        assert time.monotonic() - killed_at < 10
        for i in range(3):
            events = results[f"stream{i}"]
            assert events[-1] == "data: [DONE]"
            error = json.loads(events[-2][len("data: "):])["error"]
            assert error["code"] == 503 and "SIGKILL" in error["message"]
        assert "SIGKILL" in _error(results["plain"], 503)["message"]  # type: ignore[arg-type]

        assert "SIGKILL" in _error(httpx.get(server.base_url + "/health"), 503)["message"]
        _error(server.post("/v1/completions", json=body), 503)
        log = server.log()
        assert f"engine core 0 (pid {engine}) died" in log and "killed by SIGKILL" in log

        # SIGTERM still shuts the rest down cleanly.
        assert server.stop(signal.SIGTERM) == 0
        assert server.leftover_pids() == []
        assert server.socket_files() == []


def test_sigint_while_streaming_leaves_nothing_behind(checkpoint: Path) -> None:
    with ServerProcess(checkpoint, *TEST_SERVER_ARGS, "--shutdown-timeout", "2") as server:
        server.wait_ready()
        engine = server.engine_pid()
        assert server.abstract_sockets(), "the ipc sockets should exist while serving"
        assert server.socket_files() == [], "abstract ipc sockets put nothing on disk"
        lines: list[str] = []

        def stream() -> None:
            req = {"prompt": "long", "max_tokens": 240, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", server.base_url + "/v1/completions", json=req, timeout=60) as r:
                    lines.extend(r.iter_lines())
            except httpx.TransportError:
                pass  # the server may close the connection once its drain timeout is over

        t = threading.Thread(target=stream)
        t.start()
        wait_until(lambda: server.metric("vllm:num_requests_running") == 1, 60, "the stream to start")
        assert server.stop(signal.SIGINT) == 0, server.log()[-3000:]
        t.join(30)
        assert not t.is_alive()
        assert server.leftover_pids() == []
        assert server.socket_files() == []
        assert not Path(f"/proc/{engine}").exists() or "Z" in Path(f"/proc/{engine}/stat").read_text().split()[2]


# SIGKILL of the API server (the orphaned engine exits by itself): test_server_robustness.py's
# test_sigkill_leaves_nothing_behind, with one and with two API servers.


def test_benchmark_script_against_a_tokenizer_free_server(checkpoint: Path, tmp_path: Path) -> None:
    """benchmarks/serve.py end to end, against `--skip-tokenizer-init` (token ids in, token ids out)."""
    with ServerProcess(checkpoint, *TEST_SERVER_ARGS, "--skip-tokenizer-init") as server:
        server.wait_ready()
        _error(server.post("/v1/completions", json={"prompt": "text needs a tokenizer"}), 400)
        out = server.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}).json()
        assert len(out["choices"][0]["token_ids"]) == 3 and out["choices"][0]["text"] == ""
        result = tmp_path / "bench.json"
        bench = subprocess.run(
            [sys.executable, str(REPO_ROOT / "benchmarks" / "serve.py"), "--base-url", server.base_url,
             "--num-prompts", "6", "--input-len", "12", "--output-len", "5", "--max-concurrency", "3",
             "--vocab-size", "500", "--no-progress", "--result-json", str(result)],
            capture_output=True, text=True, timeout=120)
        assert bench.returncode == 0, bench.stdout + bench.stderr
        assert "Serving Benchmark Result" in bench.stdout
        summary = json.loads(result.read_text())
        assert summary["completed"] == 6 and summary["failed"] == 0
        assert summary["total_output_tokens"] == 30
        assert summary["mean_ttft_ms"] > 0 and summary["mean_itl_ms"] > 0
