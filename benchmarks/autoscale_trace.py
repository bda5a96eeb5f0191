"""Autoscaling under a load ramp, end to end on this machine: a picture of `elastic autoscale` at work.

Starts `elastic serve` on loopback (a tiny random CPU checkpoint, -dp 1, --admin-api-key), runs the autoscaler's
loop in this process (elastic.autoscale.Autoscaler, in a thread), drives streaming clients up and down a
schedule, then plots throughput, latency percentiles, the queue and the DP size over time.

    python benchmarks/autoscale_trace.py --plot docs/autoscaling.png --out docs/results/autoscale-cpu.json \\
        --record tests/autoscale_traces/recorded_cpu.json

Bounded: the schedule's length (default 190 s) plus the server's start and stop; the server is always killed.
Needs httpx and matplotlib (the `bench` extra).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from scale import Request, stream_request  # benchmarks/scale.py

from elastic.autoscale.config import ControllerConfig
from elastic.autoscale.controller import Autoscaler, ServerClient
from elastic.autoscale.policy import PolicyConfig
from elastic.autoscale.signals import Sample
from elastic.logger import setup_logging

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "autoscale-bench"
# Seconds-scale policy so a ramp fits in a few minutes (production defaults are 20 s / 5 min / 10 min).
POLICY = dict(min_size=1, max_size=3, up_sustain_s=5, up_cooldown_s=10, down_quiet_s=15, down_cooldown_s=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, max_num_seqs: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "elastic", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", str(max_num_seqs),
           "-dp", "1", "--admin-api-key", ADMIN_KEY, "--served-model-name", "m", "--disable-uvicorn-access-log"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # a 2-core host: one thread a rank
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Load:
    """Streaming clients; client i runs while the schedule wants more than i clients."""

    def __init__(self, url: str, schedule: list[tuple[float, int]], args: argparse.Namespace, t0: float) -> None:
        self.url, self.schedule, self.args, self.t0 = url, schedule, args, t0
        self.end = sum(seconds for seconds, _ in schedule)
        self.requests: list[Request] = []

    def clients_at(self, t: float) -> int:
        for seconds, clients in self.schedule:
            if t < seconds:
                return clients
            t -= seconds
        return 0

    async def run(self) -> None:
        most = max(c for _, c in self.schedule)
        limits = httpx.Limits(max_connections=most + 4)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as c:
            await asyncio.gather(*(self._client(c, i) for i in range(most)))

    async def _client(self, client: httpx.AsyncClient, index: int) -> None:
        rng = random.Random(index)
        while (now := self.now()) < self.end:
            if index >= self.clients_at(now):
                await asyncio.sleep(0.2)
                continue
            prompt = [rng.randrange(10, 1000) for _ in range(self.args.input_len)]
            body = {"model": "m", "prompt": prompt, "max_tokens": self.args.output_len, "ignore_eos": True,
                    "temperature": 0, "stream": True, "return_token_ids": True}
            req = Request(self.now())
            self.requests.append(req)
            await stream_request(client, body, req, self.now)

    def now(self) -> float:
        return time.perf_counter() - self.t0


class Observer:
    """For the picture only: scrapes every second, also while the autoscaler waits on its own scale (it takes
    no sample then), so the plot shows the queue and the size during an operation."""

    def __init__(self, url: str, t0: float) -> None:
        self.client, self.t0 = ServerClient(url, None), t0
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="observer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            last = self.samples[-1].dp_size if self.samples else 1
            self.samples.append(self.client.scrape(time.perf_counter() - self.t0, last))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.close()


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def phase_stats(requests: list[Request], start: float, end: float) -> dict[str, Any]:
    """Requests that started in [start, end): output tokens/s over the span, TTFT and TPOT percentiles (ms).
    TPOT is per request, (last token - first token) / (tokens - 1): robust to a loaded client reading several
    stream chunks at once, which makes single inter-token gaps read 0."""
    mine = [r for r in requests if start <= r.start < end and not r.error and r.first is not None]
    tokens = sum(1 for r in requests for t in r.token_times if start <= t < end)
    ttft = [(r.first - r.start) * 1000 for r in mine]  # type: ignore[operator]
    tpot = [(r.token_times[-1] - r.token_times[0]) * 1000 / (len(r.token_times) - 1) for r in mine
            if len(r.token_times) > 1]
    out: dict[str, Any] = {"requests": len(mine), "output_tok_s": round(tokens / max(end - start, 1e-9), 1)}
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        for p in (50, 90):
            value = percentile(values, p)
            out[f"{name}_p{p}_ms"] = None if value is None else round(value, 1)
    return out


def summarize(load: Load, scaler: Autoscaler, schedule: list[tuple[float, int]]) -> dict[str, Any]:
    """Per load phase, and per stretch of one phase at one size (scales themselves left out)."""
    phases, t = [], 0.0
    for seconds, clients in schedule:
        phases.append({"from_s": t, "to_s": t + seconds, "clients": clients,
                       **phase_stats(load.requests, t, t + seconds)})
        t += seconds
    events = [{"decided_s": round(e.t_start, 2), "done_s": round(e.t_end, 2), "from": e.decision.size,
               "to": e.decision.target, "code": e.decision.code, "reason": e.decision.reason, "outcome": e.outcome,
               **{k: e.body.get(k) for k in ("prepare_s", "blocking_s", "total_s")}} for e in scaler.events]
    return {"policy": POLICY, "phases": phases, "steady": _steady(load, scaler, schedule), "scales": events,
            "requests": len(load.requests), "failed": sum(1 for r in load.requests if r.error)}


def _steady(load: Load, scaler: Autoscaler, schedule: list[tuple[float, int]]) -> list[dict[str, Any]]:
    cuts, t = {0.0, load.end}, 0.0
    for seconds, _ in schedule:
        t += seconds
        cuts.add(t)
    for e in scaler.events:
        cuts |= {e.t_start, e.t_end}
    edges = sorted(c for c in cuts if c <= load.end)
    out = []
    for a, b in zip(edges, edges[1:]):
        if b - a < 3 or any(e.t_start <= a < e.t_end for e in scaler.events):
            continue
        size = 1
        for e in scaler.events:  # the size after the last operation that ended by `a`
            if e.t_end <= a and e.outcome == "succeeded":
                size = e.decision.target
        out.append({"from_s": round(a, 1), "to_s": round(b, 1), "clients": load.clients_at(a), "dp_size": size,
                    **phase_stats(load.requests, a, b)})
    return out


def plot(load: Load, scaler: Autoscaler, observed: list[Sample], path: Path, bin_s: float = 2.0,
         lat_bin_s: float = 5.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = load.end
    fig, axes = plt.subplots(4, 1, figsize=(10, 9), sharex=True, gridspec_kw={"height_ratios": [2, 2, 1.5, 1]})
    ax_tp, ax_lat, ax_q, ax_dp = axes
    nbins = int(end / bin_s) + 1
    counts = [0] * nbins
    for r in load.requests:
        for t in r.token_times:
            if t < end:
                counts[int(t / bin_s)] += 1
    ax_tp.plot([i * bin_s for i in range(nbins)], [c / bin_s for c in counts], lw=1.2)
    ax_tp.set_ylabel("output tokens/s")
    for name, series, style in (("TTFT", "ttft", "-"), ("TPOT", "tpot", "--")):
        for p, color in ((50, "tab:blue"), (90, "tab:red")):
            xs, ys = [], []
            for i in range(int(end / lat_bin_s) + 1):
                stats = phase_stats(load.requests, i * lat_bin_s, (i + 1) * lat_bin_s)
                if stats[f"{series}_p{p}_ms"] is not None:
                    xs.append((i + 0.5) * lat_bin_s)
                    ys.append(stats[f"{series}_p{p}_ms"])
            ax_lat.plot(xs, ys, style, color=color, lw=1.2, label=f"{name} p{p}")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.legend(ncol=4, fontsize=8, loc="upper left")
    samples = [s for s in observed if s.ok and s.t <= end]
    xs, ys, t = [], [], 0.0
    for seconds, clients in load.schedule:
        xs.append(t)
        ys.append(clients)
        t += seconds
    ax_q.step([*xs, t], [*ys, ys[-1]], where="post", color="gray", label="clients (offered)")
    ax_q.plot([s.t for s in samples], [s.waiting for s in samples], color="tab:orange", lw=1, label="waiting")
    ax_q.plot([s.t for s in samples], [s.running for s in samples], color="tab:green", lw=1, label="running")
    ax_q.set_ylabel("requests")
    ax_q.legend(ncol=3, fontsize=8, loc="upper left")
    ax_dp.step([s.t for s in samples], [s.dp_size for s in samples], where="post", color="black")
    for e in scaler.events:
        for ax in axes:
            ax.axvspan(e.t_start, e.t_end, color="orange" if e.decision.action == "up" else "tab:cyan", alpha=0.2)
    ax_dp.set_ylabel("DP size")
    ax_dp.set_yticks(range(POLICY["min_size"], POLICY["max_size"] + 1))
    ax_dp.set_xlabel("seconds (shaded: a scale decided and running; orange up, blue down)")
    fig.suptitle("elastic autoscale on a load ramp (CPU, tiny model): "
                 + " -> ".join(str(x) for x in [1, *[e.decision.target for e in scaler.events]]))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def record(scaler: Autoscaler, path: Path, run: dict[str, Any]) -> None:
    """The samples as a test trace: histograms dropped (no latency target in this policy, so the decisions do
    not read them), and the live run's scale decisions as the replay's expectation."""
    samples = [{k: round(v, 3) if isinstance(v, float) else v for k, v in s.to_json().items()
                if k not in ("ttft", "itl")} for s in scaler.window]
    decided = {id(d): round(t, 3) for t, d in scaler.decisions}  # the tick's sample time, as the replay sees it
    scales = []
    for e in scaler.events:
        if e.outcome == "succeeded":
            t = decided[id(e.decision)]
            scales.append({"action": e.decision.action, "target": e.decision.target, "at_least": round(t - 0.01, 3),
                           "at_most": round(t + 0.01, 3)})
    trace = {"description": f"Recorded by benchmarks/autoscale_trace.py on {time.strftime('%Y-%m-%d')} (CPU, tiny "
                            f"model, {run['schedule']}); the replay must make the live run's decisions.",
             "config": POLICY, "samples": samples, "expect": {"scales": scales}}
    path.write_text(json.dumps(trace, separators=(",", ":")).replace('},{"t"', '},\n{"t"') + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: a tiny random qwen3_moe)")
    ap.add_argument("--schedule", default="20:2,70:12,40:4,60:1", help="seconds:clients,... (the load ramp)")
    ap.add_argument("--max-num-seqs", type=int, default=4, help="the server's batch cap per rank: queueing sooner")
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="summary JSON")
    ap.add_argument("--record", type=Path, default=None, help="write the samples as a policy test trace")
    ap.add_argument("--server-log", type=Path, default=None, help="keep the server's log here")
    args = ap.parse_args()
    setup_logging("INFO")  # the autoscaler's decisions, as `elastic autoscale` logs them
    schedule = [(float(a), int(b)) for a, b in (x.split(":") for x in args.schedule.split(","))]
    if sum(s for s, _ in schedule) > 600:
        ap.error("keep the schedule under 10 minutes")
    with tempfile.TemporaryDirectory(prefix="autoscale-bench-") as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(REPO / "tests"))
            from checkpoints import make_checkpoint

            model = make_checkpoint("qwen3_moe", Path(tmp) / "ckpt")
        port = free_port()
        url = f"http://127.0.0.1:{port}"  # loopback only
        proc = start_server(model, port, args.max_num_seqs, args.server_log or Path(tmp) / "server.log")
        try:
            wait_ready(url, proc)
            load, scaler, observed = run(url, schedule, args)
        finally:
            stop_server(proc)
    summary = {"schedule": args.schedule, "max_num_seqs": args.max_num_seqs, **summarize(load, scaler, schedule)}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    if args.plot:
        plot(load, scaler, observed, args.plot)
    if args.record:
        record(scaler, args.record, summary)


def run(url: str, schedule: list[tuple[float, int]],
        args: argparse.Namespace) -> tuple[Load, Autoscaler, list[Sample]]:
    t0 = time.perf_counter()
    observer = Observer(url, t0)
    load = Load(url, schedule, args, t0)
    client = ServerClient(url, ADMIN_KEY)
    scaler = Autoscaler(client, PolicyConfig(**POLICY), ControllerConfig(interval_s=1.0),
                        clock=lambda: time.perf_counter() - t0)
    thread = threading.Thread(target=scaler.run, name="autoscaler", daemon=True)
    thread.start()
    try:
        asyncio.run(load.run())
    finally:
        scaler.stop.set()
        thread.join(120)
        client.close()
        observer.close()
    return load, scaler, observer.samples


if __name__ == "__main__":
    main()
