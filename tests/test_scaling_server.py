"""Elastic scaling through the real server: POST /scale under continuous streaming load.

Every request of the load must complete with exactly the tokens of an unscaled run (greedy, and seeded
sampling continuing where it stopped), whatever the scale does meanwhile: grow, shrink (requests on leaving
ranks move to survivors mid-stream), or fail and roll back. Also the API's contract (409, 400, 401,
idempotent operation ids) and, over repeated cycles, nothing left behind."""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import random_prompts
from server_fixtures import REPO_ROOT, TEST_SERVER_ARGS, ServerProcess, process_group_pids, wait_until

from elastic import LLM, SamplingParams

ADMIN = {"Authorization": "Bearer admin-key"}
PROMPTS = random_prompts((5, 9, 14, 21, 30, 7, 12, 3, 17, 25, 10, 6, 19, 8), seed=21)
NUM_GREEDY = 12  # clients streaming greedy completions; the others sample with a seed
MAX_TOKENS = 16
SEEDED = dict(temperature=0.8, top_p=0.95)
SCALE_ARGS = ("--admin-api-key", "admin-key", "--served-model-name", "m", "--scale-phase-timeout", "60")
# Up to 3 engines, the API server(s) and the clients share the CI's 2 cores: one thread per engine process.
ENV = {"OMP_NUM_THREADS": "1"}


def params(i: int) -> dict[str, Any]:
    return {"temperature": 0.0} if i < NUM_GREEDY else {**SEEDED, "seed": 1000 + i}


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    """family -> (checkpoint, the tokens every load request must produce: one unscaled engine)."""
    cache: dict[str, tuple[Path, list[list[int]]]] = {}

    def get(family: str) -> tuple[Path, list[list[int]]]:
        if family not in cache:
            path = checkpoint_dir(family)
            llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=256)
            sp = [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **params(i)) for i in range(len(PROMPTS))]
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
            cache[family] = (path, [o.outputs[0].token_ids for o in outs])
        return cache[family]

    return get


@pytest.fixture(scope="module")
def model(models) -> tuple[Path, list[list[int]]]:
    return models("qwen3_moe")


class Load:
    """One streaming client per prompt, each issuing requests back to back until stopped (asyncio, in a
    thread). Records every request's streamed tokens, or its error."""

    def __init__(self, server: ServerProcess) -> None:
        self.url = server.base_url + "/v1/completions"
        self.results: list[tuple[int, list[int] | str]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Load:
        self.thread.start()
        wait_until(lambda: len(self.results) >= len(PROMPTS), 120, "the load to get going")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopping.set()
        self.thread.join(120)
        assert not self.thread.is_alive(), "load clients hung"

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(len(PROMPTS))))

    async def _client(self, client: httpx.AsyncClient, i: int) -> None:
        body = {"model": "m", "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
                "return_token_ids": True, **params(i)}
        while not self.stopping.is_set():
            tokens: list[int] = []
            try:
                async with client.stream("POST", self.url, json=body) as r:
                    if r.status_code != 200:
                        self.results.append((i, f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"))
                        continue
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                raise RuntimeError(chunk["error"])
                            tokens += chunk["choices"][0].get("token_ids") or []
                self.results.append((i, tokens))
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                self.results.append((i, f"{type(e).__name__}: {e}"))

    def check(self, expected: list[list[int]]) -> int:
        failures = [(i, r) for i, r in self.results if isinstance(r, str)]
        assert not failures, failures[:5]
        wrong = [(i, r) for i, r in self.results if r != expected[i]]
        assert not wrong, f"{len(wrong)} of {len(self.results)} requests differ from the unscaled run: {wrong[:3]}"
        return len(self.results)


def scale(server: ServerProcess, size: int, **body: Any) -> dict[str, Any]:
    r = server.post("/scale", json={"new_data_parallel_size": size, **body}, headers=ADMIN, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def moved_requests(server: ServerProcess) -> int:
    return sum(int(n) for n in re.findall(r"(\d+) request\(s\) moved", server.log()))


def test_scale_2_3_1_2_under_load(model) -> None:
    path, expected = model
    with ServerProcess(path, *TEST_SERVER_ARGS, *SCALE_ARGS, "-dp", "2", "--max-data-parallel-size", "3",
                       env=ENV) as server:
        server.wait_ready()
        with Load(server) as load:
            sizes = []
            for size in (3, 1, 2):
                done = len(load.results)
                out = scale(server, size)
                assert out["result"] == "succeeded", out
                assert out["blocking_s"] < out["total_s"] and out["prepare_s"] > 0, out
                sizes.append(server.get("/scale").json()["data_parallel_size"])
                wait_until(lambda: len(load.results) >= done + len(PROMPTS), 120, "requests at the new size")
            assert sizes == [3, 1, 2]
            _api_contract(server)  # leaves it at 3 ranks
            done = len(load.results)
            assert scale(server, 2)["result"] == "succeeded"  # a shrink that keeps several ranks
            wait_until(lambda: len(load.results) >= done + len(PROMPTS), 120, "requests at the new size")
        count = load.check(expected)
        assert count >= 4 * len(PROMPTS)
        assert moved_requests(server) > 0, "no request was in flight on a leaving rank"
        # The metrics follow: the size, the operations, and no series of an engine that left.
        assert server.metric("elastic:data_parallel_size") == 2
        assert server.metric("elastic:scale_operations_total", direction="up", result="succeeded") == 3
        assert server.metric("elastic:scale_operations_total", direction="down", result="succeeded") == 2
        assert server.metric("elastic:scale_duration_seconds_count", phase="blocking") == 5
        engines = {dict(labels)["engine"] for name, labels in server.metrics() if name == "vllm:num_requests_running"}
        assert engines == {"0", "3"}, engines  # engine ids are stable: 1, 2 and 4 left, 3 joined and stayed
        # At rest the ranks pause; a request wakes both into a wave.
        r = server.post("/v1/completions", json={"model": "m", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS,
                                                 "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert r.json()["choices"][0]["token_ids"] == expected[1]
        assert server.stop() == 0, server.log()[-3000:]
        assert server.leftover_pids() == []
        assert "Traceback" not in server.log(), server.log()[-5000:]


def test_scale_1_2_1_through_graphs_under_load(model) -> None:
    """Scaling with the CUDA-graph paths, emulated on the CPU (ELASTIC_EMULATE_CUDA_GRAPHS: each replay an
    eager forward over the graphs' padded buffers): the next layout's decode and mixed-step graphs are
    captured beside serving and swapped in at the switch, and every request of the load has the tokens of an
    unscaled run."""
    path, expected = model
    env = {**ENV, "ELASTIC_EMULATE_CUDA_GRAPHS": "1"}
    with ServerProcess(path, *TEST_SERVER_ARGS, *SCALE_ARGS, "--ep-dispatch", "allgather", env=env) as server:
        server.wait_ready()
        with Load(server) as load:
            for size in (2, 1):
                done = len(load.results)
                assert scale(server, size)["result"] == "succeeded"
                wait_until(lambda: len(load.results) >= done + len(PROMPTS), 120, "requests at the new size")
        load.check(expected)
        log = server.log()
        assert len(re.findall(r"emulating \d+ CUDA graphs on the CPU for the next layout", log)) >= 2, log[-3000:]
        assert server.stop() == 0, server.log()[-3000:]
        assert "Traceback" not in server.log(), server.log()[-5000:]


def _api_contract(server: ServerProcess) -> None:
    """409 while another operation runs, idempotent operation ids, 400 and 401 (from size 2)."""
    assert server.post("/scale", json={"new_data_parallel_size": 3}).status_code in (401, 403)
    assert server.post("/scale", json={"new_data_parallel_size": 3},
                       headers={"Authorization": "Bearer nope"}).status_code == 401
    for body in ({"new_data_parallel_size": 0}, {"new_data_parallel_size": 4}, {"new_data_parallel_size": "2"},
                 {}, {"new_data_parallel_size": 2, "drain_timeout": -1}):
        r = server.post("/scale", json=body, headers=ADMIN)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["code"] == 400
    replies: dict[str, httpx.Response] = {}
    first = threading.Thread(target=lambda: replies.setdefault("first", server.post(
        "/scale", json={"new_data_parallel_size": 3, "operation_id": "grow-1"}, headers=ADMIN, timeout=300)))
    first.start()
    wait_until(lambda: server.get("/scale").json()["state"] != "idle", 60, "the scale to start")
    status = server.get("/scale").json()
    assert status["operation_id"] == "grow-1" and status["target"] == 3 and status["started_at"] > 0
    assert server.post("/is_scaling_elastic_ep").json()["is_scaling"] is True
    conflict = server.post("/scale", json={"new_data_parallel_size": 1, "operation_id": "other"}, headers=ADMIN)
    assert conflict.status_code == 409, conflict.text
    same = server.post("/scale_elastic_ep", json={"new_data_parallel_size": 3, "operation_id": "grow-1"},
                       headers=ADMIN, timeout=300)  # the same operation again: joins it
    first.join(300)
    assert same.status_code == 200 and replies["first"].status_code == 200
    assert same.json()["operation_id"] == replies["first"].json()["operation_id"] == "grow-1"
    again = scale(server, 3, operation_id="grow-1")  # done: the recorded outcome, nothing runs
    assert again["result"] == "succeeded" and again["total_s"] == same.json()["total_s"]
    assert scale(server, 3)["result"] == "noop"
    status = server.get("/scale").json()
    assert status["state"] == "idle" and status["data_parallel_size"] == 3 and status["last"]["result"] == "noop"


def test_two_api_servers_1_2_1_with_a_failed_start_under_load(models) -> None:
    """--api-server-count 2 (the orchestrator runs in the launcher's process): the first new rank dies while
    starting, the second between its preparation and the commit's barrier; each time the scale rolls back
    while serving goes on. The third try grows, then the server shrinks back. Mixtral with a redundant
    expert and the all-gather dispatch: 9 slots on one rank, 5 per rank on two."""
    path, expected = models("mixtral")
    # Engine ids 1 and 2: the first two a scale starts (test hooks in the engine process).
    env = {**ENV, "ELASTIC_INJECT_JOIN_FAILURE": "1", "ELASTIC_INJECT_COMMIT_FAILURE": "2"}
    with ServerProcess(path, *TEST_SERVER_ARGS, *SCALE_ARGS, "--api-server-count", "2", "--num-redundant-experts",
                       "1", "--ep-dispatch", "allgather", env=env) as server:
        server.wait_ready()
        with Load(server) as load:
            for engine in (1, 2):
                failed = scale(server, 2)
                assert failed["result"] == "rolled_back" and f"engine core {engine}" in failed["error"], failed
                assert server.get("/scale").json()["data_parallel_size"] == 1
            for size, drain in ((2, None), (1, 0.2)):  # the leaving rank's requests get 0.2 s, then move
                done = len(load.results)
                assert scale(server, size, drain_timeout=drain)["result"] == "succeeded"
                wait_until(lambda: len(load.results) >= done + len(PROMPTS), 120, "requests at the new size")
        load.check(expected)
        assert server.metric("elastic:scale_operations_total", direction="up", result="rolled_back") == 2
        assert server.metric("elastic:data_parallel_size") == 1
        assert server.stop() == 0, server.log()[-3000:]
        assert server.leftover_pids() == []


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_ten_cycles_leave_nothing_behind(model) -> None:
    path, expected = model
    with ServerProcess(path, *TEST_SERVER_ARGS, *SCALE_ARGS, env=ENV) as server:
        server.wait_ready()
        base = set(process_group_pids(server.pgid))
        # `elastic scale` from a shell: waits, prints the outcome, exit status 0.
        cli = subprocess.run([sys.executable, "-m", "elastic", "scale", "2", "--url", server.base_url,
                              "--admin-api-key", "admin-key", "--operation-id", "cli-1"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0 and json.loads(cli.stdout)["result"] == "succeeded", cli.stdout + cli.stderr
        samples = []
        for cycle in range(10):
            if cycle:
                assert scale(server, 2)["result"] == "succeeded"
            assert scale(server, 1)["result"] == "succeeded"
            wait_until(lambda: set(process_group_pids(server.pgid)) - base <= _coordinator(server), 20,
                       "the leaving rank to exit")
            keep = sorted(base | _coordinator(server))
            samples.append({pid: (_fd_count(pid), _rss_mib(pid)) for pid in keep})
        first, last = samples[1], samples[-1]
        # The last sample comes right after a rank left, when a connection to it may still be closing (a busy
        # box once showed one fd more): the counts must come back to the first cycle's within seconds, which a
        # leak never does.
        try:
            wait_until(lambda: all(_fd_count(pid) <= first[pid][0] for pid in first), 5, "the fd counts to settle")
        except TimeoutError:
            pass
        for pid in first:
            fds = _fd_count(pid)
            assert fds <= first[pid][0], f"file descriptors of {pid} grew: {first[pid][0]} -> {last[pid][0]}, {fds}"
            assert last[pid][1] < first[pid][1] + 25, f"RSS of {pid} grew: {first[pid]} -> {last[pid]} MiB"
        r = server.post("/v1/completions", json={"model": "m", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                                                 "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert r.json()["choices"][0]["token_ids"] == expected[0]
        assert server.stop() == 0
        assert server.leftover_pids() == []
        assert server.socket_files() == []


def _coordinator(server: ServerProcess) -> set[int]:
    return {int(p) for p in re.findall(r"started the DP coordinator \(pid (\d+)\)", server.log())}


def test_a_phase_deadline_rolls_back(model) -> None:
    """A new rank cannot start within --scale-phase-timeout: the scale rolls back, the state is idle again,
    the rank is stopped, and serving goes on at the old size."""
    path, expected = model
    with ServerProcess(path, *TEST_SERVER_ARGS, "--admin-api-key", "admin-key", "--served-model-name", "m",
                       "--scale-phase-timeout", "0.5", env=ENV) as server:
        server.wait_ready()
        out = scale(server, 2)
        assert out["result"] == "rolled_back" and "deadline" in out["error"], out
        status = server.get("/scale").json()
        assert status["state"] == "idle" and status["data_parallel_size"] == 1
        r = server.post("/v1/completions", json={"model": "m", "prompt": PROMPTS[2], "max_tokens": MAX_TOKENS,
                                                 "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert r.json()["choices"][0]["token_ids"] == expected[2]
        assert server.stop() == 0
        assert server.leftover_pids() == []
