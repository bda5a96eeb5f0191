"""Serving benchmark: concurrent streaming requests against a running OpenAI-compatible server.

Random token-id prompts of a fixed input length, a fixed number of output tokens (ignore_eos), arrivals
all at once or as a Poisson process, optionally capped in concurrency. Reports what `vllm bench serve`
reports: request and token throughput, TTFT / TPOT / ITL / E2E latency (mean, median, p99).

    elastic serve &                       # the demo model, or any MODEL
    python benchmarks/serve.py --num-prompts 64 --input-len 128 --output-len 64 --max-concurrency 16

Needs only httpx (and transformers to find the vocabulary of a local model; else pass --vocab-size).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

try:
    from tqdm.auto import tqdm
except ImportError:  # progress display is optional
    tqdm = None


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds to the first chunk that carries text
    itl: list[float] = field(default_factory=list)  # gaps between later text chunks
    e2e: float = 0.0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def model_info(client: httpx.AsyncClient, model: str | None) -> tuple[str, str | None]:
    r = await client.get("/v1/models")
    r.raise_for_status()
    cards = r.json()["data"]
    card = next((c for c in cards if c["id"] == model), cards[0]) if model else cards[0]
    return card["id"], card.get("root")


def vocabulary(root: str | None, vocab_size: int | None) -> tuple[list[int], Any]:
    """Token ids to draw prompts from (special tokens excluded) and the tokenizer, if one can be loaded."""
    if root and Path(root).is_dir():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(root, local_files_only=True)
            special = set(tok.all_special_ids)
            limit = vocab_size or len(tok)
            return [i for i in range(limit) if i not in special], tok
        except Exception as e:  # fall back to plain ids
            print(f"could not load the tokenizer at {root}: {e}", file=sys.stderr)
    return list(range(vocab_size or 1000)), None


async def one_request(client: httpx.AsyncClient, endpoint: str, body: dict[str, Any],
                      result: RequestResult) -> RequestResult:
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", endpoint, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text or choice.get("token_ids"):  # a server without tokenizer streams token ids only
                        now = time.perf_counter()
                        if result.ttft == 0.0:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.ttft > 0.0
        if not result.ok:
            result.error = "no output received"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def make_body(args: argparse.Namespace, model: str, prompt: list[int], tokenizer: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": args.output_len, "ignore_eos": True, "stream": True,
                            "temperature": args.temperature, "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": tokenizer.decode(prompt)}]
    else:
        body["prompt"] = prompt
    return body


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        model, root = await model_info(client, args.model)
        ids, tokenizer = vocabulary(root, args.vocab_size)
        if args.endpoint == "chat" and tokenizer is None:
            raise SystemExit("--endpoint chat needs the model's tokenizer (a local model directory)")
        rng = random.Random(args.seed)
        prompts = [[rng.choice(ids) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
        endpoint = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"

        print(f"model {model!r} at {args.base_url}; checking with one request ...")
        check = await one_request(client, endpoint, make_body(args, model, prompts[0], tokenizer), RequestResult())
        if not check.ok:
            raise SystemExit(f"the test request failed: {check.error}")

        semaphore = asyncio.Semaphore(args.max_concurrency or args.num_prompts)
        bar = tqdm(total=args.num_prompts, desc="requests", unit="req") if tqdm and not args.no_progress else None
        results = [RequestResult(prompt_len=args.input_len) for _ in prompts]

        async def limited(i: int) -> None:
            async with semaphore:
                await one_request(client, endpoint, make_body(args, model, prompts[i], tokenizer), results[i])
            if bar is not None:
                bar.update(1)

        start = time.perf_counter()
        tasks = []
        for i in range(args.num_prompts):
            tasks.append(asyncio.create_task(limited(i)))
            if args.request_rate != float("inf") and i + 1 < args.num_prompts:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
    return summarize(args, model, results, duration)


def summarize(args: argparse.Namespace, model: str, results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    ttft = [r.ttft * 1000 for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) * 1000 for r in ok if r.output_tokens > 1]
    itl = [x * 1000 for r in ok for x in r.itl]
    e2e = [r.e2e * 1000 for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    summary: dict[str, Any] = {
        "model": model, "base_url": args.base_url, "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "completed": len(ok), "failed": len(errors), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)):
        summary[f"mean_{name}_ms"] = statistics.fmean(values) if values else 0.0
        summary[f"median_{name}_ms"] = statistics.median(values) if values else 0.0
        summary[f"p99_{name}_ms"] = percentile(values, 99)
    if errors:
        summary["first_errors"] = errors[:5]
    return summary


def report(s: dict[str, Any]) -> str:
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append(f"{label:<40}{value:{fmt}}")

    row("Successful requests:", s["completed"])
    if s["failed"]:
        row("Failed requests:", s["failed"])
    row("Maximum request concurrency:", s["max_concurrency"] or "unlimited")
    row("Benchmark duration (s):", s["duration_s"], ".2f")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"], ".2f")
    row("Output token throughput (tok/s):", s["output_throughput"], ".2f")
    row("Total Token throughput (tok/s):", s["total_token_throughput"], ".2f")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:{c}^50}".format(s=f" {title} ", c="-"))
        upper = name.upper()
        row(f"Mean {upper} (ms):", s[f"mean_{name}_ms"], ".2f")
        row(f"Median {upper} (ms):", s[f"median_{name}_ms"], ".2f")
        row(f"P99 {upper} (ms):", s[f"p99_{name}_ms"], ".2f")
    lines.append("=" * 50)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request (ignore_eos)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=None, help="draw prompt ids below this (default: tokenizer's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--result-json", default=None, help="also write the numbers here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    summary = asyncio.run(run(args))
    print(report(summary))
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
