"""Beyond one machine: head + headless node, external and hybrid load balancing, a rank that joins and
leaves under load, and a node with the wrong key — over TCP between two network namespaces (tests/netns.py;
loopback when namespaces are unavailable, with a warning). Every output must equal one unscaled engine's
(greedy); no request may fail while ranks come and go."""
from __future__ import annotations

import asyncio
import secrets
import subprocess
import threading
from typing import Any

import httpx
import pytest
from conftest import random_prompts
from netns import Hosts, NodeProcess
from server_fixtures import free_port, parse_metrics, wait_until

from elastic import LLM, SamplingParams

PROMPTS = random_prompts((5, 9, 14, 21, 7, 12), seed=33)
MAX_TOKENS = 8
ARGS = ("--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "32",
        "--served-model-name", "m", "--scale-phase-timeout", "60", "--no-restart-failed-ranks")
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model(checkpoint_dir) -> tuple[str, list[list[int]]]:
    path = str(checkpoint_dir("qwen3_moe"))
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=256)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return path, [o.outputs[0].token_ids for o in outs]


@pytest.fixture()
def hosts():
    with Hosts() as h:
        yield h


@pytest.fixture()
def nodes():
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.close()


def key_env() -> dict[str, str]:
    return {**ENV, "ELASTIC_DATA_PARALLEL_KEY": secrets.token_hex(16)}


def topology(hosts: Hosts, size: int, port: int, *extra: str) -> tuple[str, ...]:
    return ("-dp", str(size), "--data-parallel-address", hosts.address["head"], "--data-parallel-rpc-port",
            str(port), *extra)


def complete(url: str, prompt: list[int]) -> list[int]:
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
        "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def check_outputs(url: str, expected: list[list[int]]) -> None:
    assert [complete(url, p) for p in PROMPTS] == expected


def test_head_and_headless_node_dp4(model, hosts, nodes) -> None:
    """Ranks 0-1 on the head, 2-3 on a headless node: outputs equal DP=1. A node with the wrong key is
    refused without effect. SIGTERM to the headless node shrinks the group to the head's two ranks; a new
    headless node offering ranks 2-3 grows it back to four."""
    path, expected = model
    port, env = free_port(), key_env()
    head = NodeProcess(hosts, "head", path, *ARGS, *topology(hosts, 4, port, "--data-parallel-size-local", "2"),
                       env=env, name="head")
    nodes.append(head)
    worker = NodeProcess(hosts, "worker", path, *ARGS, *topology(hosts, 4, port, "--data-parallel-size-local", "2",
                                                                   "--data-parallel-start-rank", "2", "--headless"),
                         http=False, env=env, name="headless")
    nodes.append(worker)
    head.wait_ready()
    check_outputs(head.url, expected)
    assert "runs rank(s) [2, 3]" in head.log()
    if hosts.isolated:  # every listening TCP socket of the head is on its configured address
        listening = subprocess.run([*hosts.prefix["head"], "ss", "-ltnH"], capture_output=True, text=True).stdout
        local = [line.split()[3] for line in listening.splitlines()]
        assert local and all(a.startswith(hosts.address["head"] + ":") for a in local), local

    intruder = NodeProcess(hosts, "worker", path, *ARGS, *topology(hosts, 4, port, "--data-parallel-size-local", "1",
                                                                     "--data-parallel-start-rank", "3", "--headless"),
                           http=False, env={**env, "ELASTIC_DATA_PARALLEL_KEY": secrets.token_hex(16)}, name="bad")
    nodes.append(intruder)
    assert intruder.wait_exit(120) == 1
    assert "refused our connection" in intruder.log() and "key" in intruder.log()
    wait_until(lambda: "failed the CURVE handshake" in head.log(), 30, "the head to log the refusal")
    check_outputs(head.url, expected)  # no effect

    worker.stop()
    assert worker.wait_exit(120) == 0
    assert httpx.get(head.url + "/scale", timeout=10).json()["data_parallel_size"] == 2

    # A headless node offering the next ranks joins: the group grows back to 4 without a POST /scale.
    again = NodeProcess(hosts, "worker", path, *ARGS, *topology(hosts, 4, port, "--data-parallel-size-local", "2",
                                                                  "--data-parallel-start-rank", "2", "--headless"),
                        http=False, env=env, name="again")
    nodes.append(again)
    wait_until(lambda: httpx.get(head.url + "/scale", timeout=10).json()["data_parallel_size"] == 4, 180,
               "the node's ranks to join")
    check_outputs(head.url, expected)


class Load:
    """Streaming greedy clients against the ranks that are ready; a 503 before anything streamed is an
    external load balancer's cue to try another rank (never a failed request)."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
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

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(len(PROMPTS))))

    async def _client(self, client: httpx.AsyncClient, i: int) -> None:
        body = {"model": "m", "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "return_token_ids": True}
        n = i
        while not self.stopping.is_set():
            n += 1
            url = self.urls[n % len(self.urls)]
            tokens: list[int] = []
            try:
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code == 503:
                        await asyncio.sleep(0.05)
                        continue  # not ready (starting or draining): the balancer picks another rank
                    if r.status_code != 200:
                        self.results.append((i, f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"))
                        continue
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunk = __import__("json").loads(line[6:])
                            if "error" in chunk:
                                raise RuntimeError(chunk["error"])
                            tokens += chunk["choices"][0].get("token_ids") or []
                self.results.append((i, tokens))
            except httpx.ConnectError:
                await asyncio.sleep(0.05)  # a rank that has gone: nothing was sent
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                self.results.append((i, f"{type(e).__name__}: {e}"))

    def check(self, expected: list[list[int]]) -> int:
        failures = [(i, r) for i, r in self.results if isinstance(r, str)]
        assert not failures, failures[:5]
        wrong = [(i, r) for i, r in self.results if r != expected[i]]
        assert not wrong, f"{len(wrong)} of {len(self.results)} requests differ from DP=1: {wrong[:3]}"
        return len(self.results)


def test_external_lb_two_ranks_then_2_3_2_under_load(model, hosts, nodes) -> None:
    """One API server + one engine per rank, each its own endpoint; a third rank started with the head's
    address joins under load, then leaves on SIGTERM: no request fails, every output equals DP=1."""
    path, expected = model
    port, env = free_port(), key_env()
    rank0 = NodeProcess(hosts, "head", path, *ARGS, *topology(hosts, 2, port, "--data-parallel-rank", "0"), env=env,
                        name="rank0")
    nodes.append(rank0)
    rank1 = NodeProcess(hosts, "worker", path, *ARGS, *topology(hosts, 2, port, "--data-parallel-rank", "1"),
                        env=env, name="rank1")
    nodes.append(rank1)
    rank0.wait_ready()
    rank1.wait_ready()
    assert complete(rank1.url, PROMPTS[0]) == expected[0]  # the load below checks every output

    urls = [rank0.url, rank1.url]
    with Load(urls) as load:
        rank2 = NodeProcess(hosts, "worker", path, *ARGS, *topology(hosts, 3, port, "--data-parallel-rank", "2"),
                            env=env, name="rank2")
        nodes.append(rank2)
        rank2.wait_ready()
        assert httpx.get(rank0.url + "/scale", timeout=10).json()["data_parallel_size"] == 3
        urls.append(rank2.url)  # the balancer sends it traffic too
        before = len(load.results)
        wait_until(lambda: len(load.results) >= before + len(PROMPTS), 120, "requests on three ranks")
        # The new rank's own endpoint serves, on its own engine.
        wait_until(lambda: served_by_engine(rank2) == {"2"}, 120, "requests served by the new rank")
        # Out of the balancer first, then SIGTERM: what it runs finishes there (the drain), then it leaves.
        # (Requests sent to it meanwhile would race uvicorn closing keep-alive connections at exit.)
        urls.remove(rank2.url)
        rank2.stop()
        assert rank2.wait_exit(120) == 0
        assert httpx.get(rank0.url + "/scale", timeout=10).json()["data_parallel_size"] == 2
        before = len(load.results)
        wait_until(lambda: len(load.results) >= before + len(PROMPTS), 120, "requests after the shrink")
    assert load.check(expected) >= 3 * len(PROMPTS)
    log = rank0.log()
    assert "asks to join as rank(s) [2]" in log and "join-" in log and "leave-" in log


def test_hybrid_lb(model, hosts, nodes) -> None:
    """One API server per node, each balancing over its own ranks (head: rank 0; worker: ranks 1 and 2)."""
    path, expected = model
    port, env = free_port(), key_env()
    head = NodeProcess(hosts, "head", path, *ARGS, *topology(hosts, 3, port, "--data-parallel-hybrid-lb",
                                                               "--data-parallel-size-local", "1"), env=env, name="h")
    nodes.append(head)
    worker = NodeProcess(hosts, "worker", path, *ARGS, *topology(hosts, 3, port, "--data-parallel-hybrid-lb",
                                                                   "--data-parallel-size-local", "2",
                                                                   "--data-parallel-start-rank", "1"),
                         env=env, name="w")
    nodes.append(worker)
    head.wait_ready()
    worker.wait_ready()
    with Load([worker.url]) as load:  # concurrent requests: the worker's API server uses both its ranks
        check_outputs(head.url, expected)
    load.check(expected)
    assert served_by_engine(head) == {"0"}
    assert served_by_engine(worker) == {"1", "2"}  # both of the worker's ranks, none of the head's


def served_by_engine(node: NodeProcess) -> set[str]:
    """The engines (labels) through which this API server finished requests."""
    values = parse_metrics(httpx.get(node.url + "/metrics", timeout=10).text)
    return {dict(labels)["engine"] for (name, labels), v in values.items()
            if name == "vllm:request_success_total" and v > 0}
