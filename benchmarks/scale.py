"""Elastic scaling benchmark: scale a running server up and down under continuous streaming load.

Reports, for each scale, the server's split (prepare beside serving / blocking window / total) and the
HTTP call's wall time; and latency percentiles (TTFT, inter-token, end-to-end) of the requests that were in
flight during a scale beside those of steady state, plus failed requests (there should be none). Optionally
plots throughput, inter-token latency and the data-parallel size over time.

    elastic serve MODEL -dp 2 --admin-api-key KEY &
    python benchmarks/scale.py --admin-api-key KEY --schedule 3,1,2 --concurrency 16 \\
        --out scale.json --plot docs/scaling.png

Needs httpx (and matplotlib for --plot).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx


@dataclass
class Request:
    start: float
    end: float = 0.0
    first: float | None = None
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


@dataclass
class Scale:
    target: int
    start: float
    end: float = 0.0
    reply: dict[str, Any] = field(default_factory=dict)


async def stream_request(client: httpx.AsyncClient, body: dict[str, Any], req: Request,
                         now: Callable[[], float], token_ids: list[int] | None = None) -> None:
    """One streamed /v1/completions call: token times, count and any error (HTTP status, an error event,
    a dropped connection) into `req`, the tokens into `token_ids` if given. Shared with
    benchmarks/autoscale_trace.py and benchmarks/chaos.py."""
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                req.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    req.error = str(chunk["error"])
                    return
                ids = chunk["choices"][0].get("token_ids") or [] if chunk["choices"] else []
                t = now()
                req.first = req.first if req.first is not None else t
                req.token_times += [t] * len(ids)
                req.tokens += len(ids)
                if token_ids is not None:
                    token_ids += ids
    except httpx.HTTPError as e:
        req.error = f"{type(e).__name__}: {e}"
    finally:
        req.end = now()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class LoadGenerator:
    """`concurrency` streaming clients issuing random token-id prompts back to back until stopped."""

    def __init__(self, base_url: str, model: str, args: argparse.Namespace, t0: float) -> None:
        self.base_url, self.model, self.args, self.t0 = base_url, model, args, t0
        self.requests: list[Request] = []
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.args.concurrency + 8)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=600, limits=limits) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(self.args.concurrency)))

    async def _client(self, client: httpx.AsyncClient, index: int) -> None:
        rng = random.Random(index)
        while not self.stopping.is_set():
            prompt = [rng.randrange(10, self.args.vocab_size) for _ in range(self.args.input_len)]
            body = {"model": self.model, "prompt": prompt, "max_tokens": self.args.output_len, "ignore_eos": True,
                    "temperature": 0, "stream": True, "return_token_ids": True}
            req = Request(self._now())
            self.requests.append(req)
            await stream_request(client, body, req, self._now)
            if not req.error and req.tokens != self.args.output_len:
                req.error = f"{req.tokens} tokens, expected {self.args.output_len}"

    def _now(self) -> float:
        return time.perf_counter() - self.t0


def latency(requests: list[Request]) -> dict[str, float]:
    ok = [r for r in requests if not r.error and r.first is not None]
    ttft = [r.first - r.start for r in ok]  # type: ignore[operator]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    e2e = [r.end - r.start for r in ok]
    out = {"requests": len(requests), "failed": len(requests) - len(ok)}
    for name, values in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for p in (50, 90, 99):
            out[f"{name}_p{p}_ms"] = round(percentile(values, p) * 1000, 2)
    out["itl_max_ms"] = round(max(itl, default=float("nan")) * 1000, 2)
    return out


def split(requests: list[Request], scales: list[Scale], warmup: float) -> tuple[list[Request], list[Request]]:
    """(in flight during a scale, steady state: overlapping no scale and started after the warm-up)."""
    def overlaps(r: Request) -> bool:
        return any(r.start < s.end and r.end > s.start for s in scales)

    during = [r for r in requests if overlaps(r)]
    steady = [r for r in requests if not overlaps(r) and r.start >= warmup]
    return during, steady


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.admin_api_key}"} if args.admin_api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, timeout=3600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        initial = (await client.get("/scale")).json()["data_parallel_size"]
        t0 = time.perf_counter()
        load = LoadGenerator(args.base_url, model, args, t0)
        load_task = asyncio.ensure_future(load.run())
        await asyncio.sleep(args.steady_s)
        scales = []
        for target in args.schedule:
            scale = Scale(target, time.perf_counter() - t0)
            r = await client.post("/scale", json={"new_data_parallel_size": target, "drain_timeout": args.drain_timeout},
                                  headers=headers)
            scale.end, scale.reply = time.perf_counter() - t0, r.json()
            scales.append(scale)
            print(f"scale to {target}: HTTP {r.status_code} {json.dumps({k: scale.reply.get(k) for k in ('result', 'prepare_s', 'blocking_s', 'total_s')})}")
            await asyncio.sleep(args.settle_s)
        load.stopping.set()
        await load_task
    during, steady = split(load.requests, scales, args.steady_s / 2)
    return {"args": {k: v for k, v in vars(args).items() if k not in ("admin_api_key", "plot", "out")},
            "initial_size": initial, "scales": [asdict(s) for s in scales],
            "during_scale": latency(during), "steady_state": latency(steady), "all": latency(load.requests),
            "requests": [asdict(r) for r in load.requests]}


def throughput_by_size(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Output tokens/s of each settled stretch (between two scales) and the DP size serving it."""
    tokens = sorted(t for r in result["requests"] for t in r["token_times"])
    edges, size = [(0.0, result["initial_size"])], result["initial_size"]
    stretches = []
    for s in result["scales"]:
        if s["reply"].get("result") == "succeeded":
            size = s["target"]
        edges.append((s["start"], None))
        edges.append((s["end"], size))
    edges.append((tokens[-1] if tokens else 0.0, None))
    for (start, size_here), (end, _) in zip(edges, edges[1:]):
        if size_here is None or end - start < 1.0:
            continue
        count = sum(start <= t < end for t in tokens)
        stretches.append({"size": size_here, "seconds": round(end - start, 2),
                          "output_tok_s": round(count / (end - start), 1)})
    return stretches


def plot(result: dict[str, Any], path: Path, bin_s: float = 0.5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    requests = result["requests"]
    end = max(r["end"] for r in requests)
    bins = [i * bin_s for i in range(int(end / bin_s) + 2)]
    counts = [0] * len(bins)
    for r in requests:
        for t in r["token_times"]:
            counts[int(t / bin_s)] += 1
    fig, (ax_tp, ax_lat, ax_dp) = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True,
                                               gridspec_kw={"height_ratios": [2, 2, 1]})
    ax_tp.plot(bins, [c / bin_s for c in counts], lw=1)
    ax_tp.set_ylabel("output tokens/s")
    points = [(b, (b - a) * 1000) for r in requests for a, b in zip(r["token_times"], r["token_times"][1:])]
    ax_lat.scatter([p[0] for p in points], [p[1] for p in points], s=2, alpha=0.4)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("inter-token latency (ms)")
    times, sizes = [0.0], [result["initial_size"]]
    for s in result["scales"]:
        for ax in (ax_tp, ax_lat, ax_dp):
            ax.axvspan(s["start"], s["end"], color="orange", alpha=0.15)
        if s["reply"].get("result") == "succeeded":
            times.append(s["end"])
            sizes.append(s["target"])
    times.append(end)
    sizes.append(sizes[-1])
    ax_dp.step(times, sizes, where="post")
    ax_dp.set_ylabel("DP size")
    ax_dp.set_xlabel("seconds (shaded: a scale in progress)")
    ax_dp.set_yticks(sorted(set(sizes)))
    fig.suptitle("Elastic scaling under load: " + " -> ".join(str(x) for x in [result["initial_size"]] +
                                                               [s["target"] for s in result["scales"]]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--admin-api-key", default=None)
    ap.add_argument("--schedule", type=lambda s: [int(x) for x in s.split(",")], default=[2, 1],
                    help="sizes to scale to, in order, e.g. 3,1,2")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--vocab-size", type=int, default=1000, help="prompt token ids are drawn below this")
    ap.add_argument("--steady-s", type=float, default=10.0, help="load before the first scale")
    ap.add_argument("--settle-s", type=float, default=10.0, help="load after each scale")
    ap.add_argument("--drain-timeout", type=float, default=0.0)
    ap.add_argument("--out", type=Path, default=None, help="write the results (JSON)")
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG: throughput, latency, DP size over time")
    args = ap.parse_args()
    result = asyncio.run(drive(args))
    result["throughput_by_size"] = throughput_by_size(result)
    for name in ("steady_state", "during_scale", "throughput_by_size"):
        print(f"{name:>13}: {json.dumps(result[name])}")
    if args.out:
        args.out.write_text(json.dumps(result))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
