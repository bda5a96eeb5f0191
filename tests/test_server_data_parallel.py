"""`elastic serve --data-parallel-size N`: N engine-core processes and the DP coordinator behind one API
server. Greedy outputs equal the single-rank engine's, requests spread over the ranks, nothing runs at rest,
and one dead rank fails every in-flight request at once instead of hanging the others."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import random_prompts
from server_fixtures import TEST_SERVER_ARGS, ServerProcess, process_group_pids, wait_until

from elastic import LLM, SamplingParams

PROMPTS = random_prompts((4, 9, 15, 22, 31, 7), seed=9)
MAX_TOKENS = 10
# Requests that must still be running when a rank is killed: long enough to outlast the test's polling.
LONG_CONTEXT = ("--max-model-len", "2048")
LONG_TOKENS = 1800


def reference(path: Path) -> list[list[int]]:
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=256)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def pids_in_log(server: ServerProcess, what: str) -> dict[int, int]:
    """{engine index: pid} of the started engine cores (what='engine'), or {-1: pid} of the coordinator."""
    log = server.log()
    if what == "coordinator":
        return {-1: int(m) for m in re.findall(r"started the DP coordinator \(pid (\d+)\)", log)}
    return {int(i): int(p) for i, p in re.findall(r"started engine core (\d+) \(pid (\d+)\)", log)}


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def completions_concurrently(server: ServerProcess) -> list[list[int]]:
    async with server.async_openai() as client:
        outs = await asyncio.gather(*(client.completions.create(
            model="m", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True}) for p in PROMPTS))
    return [o.choices[0].model_extra["token_ids"] for o in outs]


def success_by_engine(server: ServerProcess, world: int) -> list[float]:
    counts = []
    for i in range(world):
        try:
            counts.append(server.metric("vllm:request_success_total", engine=str(i)))
        except KeyError:
            counts.append(0.0)
    return counts


@pytest.fixture(scope="module")
def dp2_server(checkpoint_dir):
    path = checkpoint_dir("qwen2_moe")
    with ServerProcess(path, *TEST_SERVER_ARGS, "--served-model-name", "m", "--data-parallel-size", "2",
                       "--ep-dispatch", "allgather") as server:
        server.wait_ready()
        yield path, server
        # A clean stop: exit 0, every engine and the coordinator gone, no socket file, no traceback.
        assert server.stop() == 0, server.log()[-3000:]
        assert server.leftover_pids() == []
        assert server.socket_files() == []
        assert "Traceback" not in server.log(), server.log()[-5000:]


def test_greedy_equals_single_rank_and_requests_spread(dp2_server) -> None:
    path, server = dp2_server
    before = success_by_engine(server, 2)
    assert asyncio.run(completions_concurrently(server)) == reference(path)
    after = success_by_engine(server, 2)
    spread = [a - b for a, b in zip(after, before)]
    assert sum(spread) == len(PROMPTS) and min(spread) > 0, spread
    # Each engine's gauges are exported once, under its own label.
    for i in range(2):
        assert server.metric("vllm:num_requests_running", engine=str(i)) == 0
        assert server.metric("vllm:kv_cache_usage_perc", engine=str(i)) == 0


def test_stream_and_quiet_at_rest(dp2_server) -> None:
    _, server = dp2_server
    body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": 6, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) == 7
    wait_until(lambda: server.metric("vllm:num_requests_running") == 0, 10, "the wave to end")
    pids = [*pids_in_log(server, "engine").values(), *pids_in_log(server, "coordinator").values()]
    assert len(pids) == 3
    before = [cpu_ticks(p) for p in pids]
    time.sleep(1.0)  # measuring CPU use at rest takes a while; nothing waits on a result here
    used = [cpu_ticks(p) - b for p, b in zip(pids, before)]
    assert max(used) <= 2, f"CPU ticks (1/100 s) used at rest by engines and coordinator: {used}"


def test_dp3_kill_one_rank_recovers(checkpoint_dir) -> None:
    """kill -9 one rank of three (Mixtral, one redundant expert): the in-flight requests of every rank complete
    (the dead rank's re-run on a survivor), the survivors serve on at size 2 (--no-restart-failed-ranks) with
    the unscaled outputs; docs/reliability.md. The old fail-fast remains for a lone engine without restarts
    (test_server_lifecycle.py)."""
    path = checkpoint_dir("mixtral")
    with ServerProcess(path, *TEST_SERVER_ARGS, *LONG_CONTEXT, "--served-model-name", "m", "-dp", "3",
                       "--num-redundant-experts", "1", "--no-restart-failed-ranks") as server:
        server.wait_ready()
        assert asyncio.run(completions_concurrently(server)) == reference(path)
        assert min(success_by_engine(server, 3)) > 0

        results: dict[str, object] = {}

        def stream(i: int) -> None:
            req = {"model": "m", "prompt": PROMPTS[i], "max_tokens": 200, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", server.base_url + "/v1/completions", json=req, timeout=120) as r:
                results[f"stream{i}"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        def plain() -> None:
            req = {"model": "m", "prompt": PROMPTS[3], "max_tokens": 200, "ignore_eos": True}
            results["plain"] = server.post("/v1/completions", json=req, timeout=120)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)] + [threading.Thread(target=plain)]
        for t in threads:
            t.start()
        wait_until(lambda: server.metric("vllm:num_requests_running") == 4, 60, "4 running requests")
        engines = pids_in_log(server, "engine")
        os.kill(engines[1], signal.SIGKILL)
        assert server.health() == 200  # liveness holds while the server recovers by itself
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "in-flight requests hung after a rank died"
        for i in range(3):  # every request completes, the dead rank's too
            events = results[f"stream{i}"]
            assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), events[-3:]  # type: ignore
        assert results["plain"].status_code == 200  # type: ignore[attr-defined]
        wait_until(lambda: "recovery: serving succeeded" in server.log(), 60, "serving at 2 ranks")
        assert asyncio.run(completions_concurrently(server)) == reference(path)
        assert server.get("/scale").json()["data_parallel_size"] == 2 and server.get("/ready").status_code == 200
        assert engines[0] in process_group_pids(server.pgid) and engines[2] in process_group_pids(server.pgid)
        assert server.stop() == 0
        assert server.leftover_pids() == []
        assert server.socket_files() == []


def test_two_api_servers_share_the_port(checkpoint_dir) -> None:
    """--api-server-count 2: both processes serve (SO_REUSEPORT), each talks to every engine and the
    coordinator, and /metrics adds up across them whichever process answers the scrape."""
    path = checkpoint_dir("qwen3_moe")
    with ServerProcess(path, *TEST_SERVER_ARGS, *LONG_CONTEXT, "--served-model-name", "m", "-dp", "2",
                       "--api-server-count", "2", "--no-restart-failed-ranks") as server:
        server.wait_ready()
        expected = reference(path)
        num_rounds = 3

        async def many_clients() -> list[list[list[int]]]:
            return await asyncio.gather(*(completions_concurrently(server) for _ in range(num_rounds)))

        assert asyncio.run(many_clients()) == [expected] * num_rounds
        log = server.log()
        served = [len(re.findall(rf"\[APIServer_{k}\] uvicorn.access: .* \"POST /v1/completions", log)) for k in (0, 1)]
        assert sum(served) == num_rounds * len(PROMPTS) and min(served) > 0, served
        total = num_rounds * len(PROMPTS)
        for _ in range(4):  # each scrape may land on either API server: all must agree
            samples = server.metrics()
            success = {dict(labels)["engine"]: v for (name, labels), v in samples.items()
                       if name == "vllm:request_success_total"}
            assert sum(success.values()) == total and set(success) == {"0", "1"}, success
            gauges = [labels for name, labels in samples if name == "vllm:num_requests_running"]
            assert sorted(dict(g)["engine"] for g in gauges) == ["0", "1"], gauges  # once per engine, no pid

        # One rank dies: every API server re-runs its requests of that rank on the survivor (docs/reliability.md).
        results: dict[str, httpx.Response] = {}

        def plain(i: int) -> None:
            req = {"model": "m", "prompt": PROMPTS[i], "max_tokens": 64, "ignore_eos": True}
            results[str(i)] = httpx.post(server.base_url + "/v1/completions", json=req, timeout=120)

        threads = [threading.Thread(target=plain, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: server.metric("vllm:num_requests_running") == 4, 60, "4 running requests")
        os.kill(pids_in_log(server, "engine")[1], signal.SIGKILL)
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64 for r in results.values()), \
            [(r.status_code, r.text[:200]) for r in results.values()]
        wait_until(lambda: "recovery: serving succeeded" in server.log(), 60, "serving at 1 rank")
        for _ in range(4):  # liveness held, and every API server serves again
            assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
        assert server.stop() == 0, server.log()[-3000:]
        assert server.leftover_pids() == []
        assert server.socket_files() == []
