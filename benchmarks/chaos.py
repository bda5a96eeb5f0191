"""Chaos run: random kill -9 of engine ranks, the DP coordinator and API servers during a bounded load run.

Starts its own server (so it knows every process), measures the greedy output of each prompt of a fixed pool
once before any kill, then runs `--concurrency` streaming clients for `--duration` seconds while killing a
random target every `--kill-every` seconds (jittered). Reports requests sent / completed / re-run (the
server's elastic:requests_rerun_total) / failed / wrong (tokens differing from the undisturbed output), the
recovery time of each kill (to serving again and back at full size, read from the server log), and plots
throughput and the DP size over time with the kills marked.

    python benchmarks/chaos.py --dp 3 --api-servers 2 --duration 120 --kill-every 20 \\
        --out docs/results/chaos-cpu.json --plot docs/reliability.png

Streams an API server carried when it was killed break with it (their TCP connection closes): counted apart
as `lost_with_api_server`, since no server can answer on a connection whose process is gone.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from scale import Request, percentile, stream_request  # benchmarks/scale.py

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "chaos-bench"
_CONNECTION_LOST = ("RemoteProtocolError", "ReadError", "ConnectError", "WriteError")


# ---- the server and its processes ------------------------------------------------------------------------
def start_server(model: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "elastic", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-dp", str(args.start_dp or args.dp), "--api-server-count", str(args.api_servers),
           "--admin-api-key", ADMIN_KEY,
           "--served-model-name", "m", "--disable-uvicorn-access-log", *args.serve_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Every API server ready: the port spreads connections over them, so 20 answers in a row."""
    deadline, in_a_row = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            in_a_row = in_a_row + 1 if httpx.get(url + "/ready", timeout=5).status_code == 200 else 0
        except httpx.HTTPError:
            in_a_row = 0
        if in_a_row >= 20:
            return
        time.sleep(0.05 if in_a_row else 0.5)
    raise TimeoutError("the server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def grow(url: str, size: int) -> None:
    """Reach the full size by POST /scale (a server started small sizes its KV cache for one rank holding every
    expert, so a shrink back to it after a failure fits in memory)."""
    r = httpx.post(url + "/scale", json={"new_data_parallel_size": size}, timeout=900,
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    if r.status_code != 200 or r.json().get("result") != "succeeded":
        raise RuntimeError(f"scaling to {size} ranks failed: {r.status_code} {r.text[:300]}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def targets(log: str, api_servers: int) -> dict[str, int]:
    """Processes that may be killed now, by name: rank-<engine id>, coordinator, api-<k> -> pid. Only the
    current members (the latest engines started, alive), and API servers only with several of them."""
    found: dict[str, int] = {}
    for engine_id, pid in re.findall(r"started engine core (\d+) \(pid (\d+)\)", log):
        found[f"rank-{engine_id}"] = int(pid)
    coordinators = re.findall(r"started the DP coordinator \(pid (\d+)\)", log)
    if coordinators:
        found["coordinator"] = int(coordinators[-1])
    if api_servers > 1:
        for k, pid in re.findall(r"\[APIServer_(\d+)\] uvicorn.error: Started server process \[(\d+)\]", log):
            found[f"api-{k}"] = int(pid)
    return {name: pid for name, pid in found.items() if alive(pid)}


# ---- load --------------------------------------------------------------------------------------------------
class Load:
    def __init__(self, url: str, prompts: list[list[int]], expected: list[list[int]], args: argparse.Namespace,
                 t0: float) -> None:
        self.url, self.prompts, self.expected, self.args, self.t0 = url, prompts, expected, args, t0
        self.requests: list[tuple[int, Request, list[int]]] = []
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=600) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(self.args.concurrency)))

    async def _client(self, client: httpx.AsyncClient, index: int) -> None:
        rng = random.Random(index)
        while not self.stopping.is_set():
            p = rng.randrange(len(self.prompts))
            req, tokens = Request(self._now()), []
            self.requests.append((p, req, tokens))
            await stream_request(client, self._body(p), req, self._now, tokens)

    def _body(self, p: int) -> dict[str, Any]:
        return {"model": "m", "prompt": self.prompts[p], "max_tokens": self.args.output_len, "ignore_eos": True,
                "temperature": 0, "stream": True, "return_token_ids": True}

    def _now(self) -> float:
        return time.perf_counter() - self.t0


async def reference(url: str, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    """Each prompt's greedy output before any kill (greedy output does not depend on the number of ranks)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(prompt: list[int]) -> list[int]:
            r = await client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": output_len,
                                                           "ignore_eos": True, "temperature": 0,
                                                           "return_token_ids": True})
            r.raise_for_status()
            return r.json()["choices"][0]["token_ids"]

        return list(await asyncio.gather(*(one(p) for p in prompts)))


# ---- chaos -------------------------------------------------------------------------------------------------
async def chaos(url: str, log_path: Path, load: Load, args: argparse.Namespace) -> list[dict[str, Any]]:
    """A kill every ~kill_every s, each once the server is back at full size: a random target of a random
    kind among --targets, or the next of --sequence."""
    rng, kills, sequence = random.Random(args.seed), [], list(args.sequence)
    while load._now() < args.duration - args.kill_every / 2 and (sequence or not args.sequence):
        await asyncio.sleep(args.kill_every * (rng.uniform(0.7, 1.3) if not args.sequence else 1.0))
        if load._now() >= args.duration - 5:
            break
        if not await _serving_at_full_size(url, args.dp):
            continue  # the last recovery is not done: one failure at a time is what is measured here
        found = targets(log_path.read_text(errors="replace"), args.api_servers)
        kinds = [k for k in (sequence[:1] or args.targets) if any(_is(name, k) for name in found)]
        if not kinds:
            continue
        kind = rng.choice(kinds)
        if sequence:
            sequence.pop(0)
        name = rng.choice(sorted(n for n in found if _is(n, kind)))
        offset = len(log_path.read_bytes())
        os.kill(found[name], signal.SIGKILL)
        kills.append({"target": name, "pid": found[name], "t": round(load._now(), 3), "log_offset": offset,
                      "wall": time.time()})
        print(f"{load._now():7.1f}s  kill -9 {name} (pid {found[name]})", flush=True)
    return kills


def _is(name: str, kind: str) -> bool:
    """'rank-3' is of kind 'rank' and 'rank-3'; 'coordinator' of 'coordinator'."""
    return name == kind or name.startswith(kind + "-")


async def _serving_at_full_size(url: str, size: int) -> bool:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        try:
            ready = (await client.get("/ready")).status_code == 200
            status = (await client.get("/scale")).json()
        except httpx.HTTPError:
            return False
    return ready and status["data_parallel_size"] == size and status["state"] == "idle"


def recovery_times(kills: list[dict[str, Any]], log: str) -> None:
    """Seconds from each kill to serving again and back at full size (server log timestamps: 1 s resolution,
    so the server's own measurements are used where it logs them)."""
    for kill in kills:
        after = log.encode()[kill.pop("log_offset"):].decode(errors="replace")
        if kill["target"].startswith("rank"):
            serving = re.search(r"recovery: serving (\w+) after ([\d.]+)s", after)
            restored = re.search(r"recovery: restored (\w+) after ([\d.]+)s", after)
            kill["serving_s"] = float(serving.group(2)) if serving else None
            kill["restored_s"] = float(restored.group(2)) if restored else None
            kill["result"] = serving.group(1) if serving else "not seen"
        elif kill["target"] == "coordinator":
            m = re.search(r"DP coordinator restarted in ([\d.]+)s", after)
            kill["serving_s"] = kill["restored_s"] = float(m.group(1)) if m else None
            kill["result"] = "succeeded" if m else "not seen"
        else:  # the new API server's "ready" line (log timestamps: to the second)
            k = kill["target"].split("-")[1]
            m = re.search(rf"^(\d\d-\d\d \d\d:\d\d:\d\d) INFO \[APIServer_{k}\] .*ready: serving", after, re.M)
            kill["result"] = "restarted" if "restarting it" in after else "not seen"
            if m:
                year = time.localtime(kill["wall"]).tm_year
                ready = time.mktime(time.strptime(f"{year}-{m.group(1)}", "%Y-%m-%d %H:%M:%S"))
                kill["serving_s"] = kill["restored_s"] = round(max(0.0, ready - int(kill["wall"])), 0)
        kill.pop("wall")


def stalls(load: Load, kills: list[dict[str, Any]]) -> None:
    """Per kill, what clients saw: the longest gap between two tokens (all streams together) in the 10 s
    after the kill (the kill itself counts as the first), about the time until serving again."""
    times = sorted(t for _, r, _ in load.requests for t in r.token_times)
    for kill in kills:
        window = [kill["t"]] + [t for t in times if kill["t"] < t <= kill["t"] + 10]
        kill["stall_s"] = round(max((b - a for a, b in zip(window, window[1:])), default=float("nan")), 3)


def summarize(load: Load, kills: list[dict[str, Any]], rerun: float, args: argparse.Namespace) -> dict[str, Any]:
    stalls(load, kills)
    done = [(p, r, t) for p, r, t in load.requests if r.end]
    lost = [r for _, r, _ in done if r.error.split(":")[0] in _CONNECTION_LOST]
    failed = [r for _, r, _ in done if r.error and r not in lost]
    ok = [(p, r, t) for p, r, t in done if not r.error]
    wrong = [r for p, r, t in ok if t != load.expected[p]]
    ttft = [r.first - r.start for _, r, _ in ok if r.first is not None]
    return {"sent": len(load.requests), "completed": len(ok), "rerun": int(rerun), "failed": len(failed),
            "lost_with_api_server": len(lost), "wrong": len(wrong), "errors": sorted({r.error for r in failed})[:5],
            "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1), "ttft_p99_ms": round(percentile(ttft, 99) * 1000, 1),
            "kills": kills, "args": {k: v for k, v in vars(args).items() if k not in ("out", "plot")}}


def plot(load: Load, kills: list[dict[str, Any]], sizes: list[tuple[float, int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bin_s = 1.0
    ends = [r.end for _, r, _ in load.requests if r.end and not r.error]
    tokens = [t for _, r, _ in load.requests for t in r.token_times]
    n = int(max(ends + tokens + [1.0]) / bin_s) + 1
    tok = [0] * n
    for t in tokens:
        tok[int(t / bin_s)] += 1
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([i * bin_s for i in range(n)], [c / bin_s for c in tok], lw=1)
    ax.set_ylabel("tokens / s")
    for kill in kills:
        for a in (ax, ax2):
            a.axvline(kill["t"], color="red", ls="--", lw=0.8)
        ax.annotate(kill["target"], (kill["t"], ax.get_ylim()[1] * 0.95), fontsize=7, color="red", rotation=90,
                    va="top", ha="right")
    if sizes:
        ax2.step([t for t, _ in sizes], [s for _, s in sizes], where="post")
    ax2.set_ylabel("DP size")
    ax2.set_xlabel("seconds")
    fig.suptitle("kill -9 under streaming load (red: kills)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def sample_sizes(url: str, load: Load, sizes: list[tuple[float, int]]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not load.stopping.is_set():
            try:
                sizes.append((load._now(), (await client.get("/scale")).json()["data_parallel_size"]))
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.5)


async def run(args: argparse.Namespace, url: str, log_path: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(10, args.vocab_size) for _ in range(args.input_len)] for _ in range(args.prompts)]
    expected = await reference(url, prompts, args.output_len)
    load = Load(url, prompts, expected, args, time.perf_counter())
    sizes: list[tuple[float, int]] = []
    runner = asyncio.ensure_future(load.run())
    sampler = asyncio.ensure_future(sample_sizes(url, load, sizes))
    kills = await chaos(url, log_path, load, args)
    await asyncio.sleep(max(0.0, args.duration - load._now()))
    load.stopping.set()
    await asyncio.gather(runner, sampler)
    await asyncio.sleep(1.0)
    metrics = httpx.get(url + "/metrics", timeout=10).text
    rerun = sum(float(v) for v in re.findall(r"^elastic:requests_rerun_total\{[^}]*\} ([\d.e+]+)$", metrics, re.M))
    recovery_times(kills, log_path.read_text(errors="replace"))
    result = summarize(load, kills, rerun, args)
    if args.plot:
        plot(load, kills, sizes, args.plot)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: a tiny random qwen3_moe)")
    ap.add_argument("--dp", type=int, default=3, help="ranks during the run")
    ap.add_argument("--start-dp", type=int, default=None, help="start with this many ranks, then scale to --dp")
    ap.add_argument("--api-servers", type=int, default=2)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load (kills stop 5 s before)")
    ap.add_argument("--kill-every", type=float, default=20.0, help="mean seconds between kills")
    ap.add_argument("--targets", default="rank,coordinator,api", help="comma-separated kinds to kill")
    ap.add_argument("--sequence", default="", help="kill these in order instead (e.g. rank-1,coordinator)")
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=24)
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--server-log", type=Path, default=None)
    ap.add_argument("serve_args", nargs="*", help="more `elastic serve` arguments (after --)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # `timeout`: still stop the server (finally below)
    args.targets = args.targets.split(",")
    args.sequence = [s for s in args.sequence.split(",") if s]
    if not args.serve_args:
        args.serve_args = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "256"]
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(REPO / "tests"))
            from checkpoints import make_checkpoint

            model = make_checkpoint("qwen3_moe", Path(tmp) / "ckpt")
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url, log_path = f"http://127.0.0.1:{port}", args.server_log or Path(tmp) / "server.log"
        proc = start_server(model, port, args, log_path)
        try:
            wait_ready(url, proc, 300)
            if args.start_dp and args.start_dp != args.dp:
                grow(url, args.dp)
                wait_ready(url, proc, 300)
            result = asyncio.run(run(args, url, log_path))
        finally:
            stop_server(proc)
    result["args"]["model"] = str(args.model or "tiny qwen3_moe")
    result["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in result["args"].items()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
