"""`elastic scale`: resize a running server's data/expert parallelism from a shell (POST /scale).

    elastic scale 4 --url http://host:8000 --admin-api-key KEY      # waits until done, prints the timings
    elastic scale --status --url http://host:8000                     # GET /scale
Exit status: 0 when the scale succeeded (or nothing was to do), 1 when it was rolled back or failed,
2 for a refused request (400, 401, 403, 409) or an unreachable server.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

_TIMEOUT_S = 3600.0  # a scale's phases have their own deadlines; this only bounds a lost connection


def add_scale_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "scale", help="resize a running server's data/expert parallelism (POST /scale)",
        description="Ask a running `elastic serve` to change its number of data/expert-parallel ranks and wait "
                    "until done. Requests keep being served meanwhile.")
    p.set_defaults(handler=scale_command, command_parser=p)
    p.add_argument("size", nargs="?", type=int, metavar="N", help="the new number of ranks")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--admin-api-key", default=os.environ.get("ELASTIC_ADMIN_API_KEY"),
                   help="the server's --admin-api-key (default: $ELASTIC_ADMIN_API_KEY)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="scale-down: seconds requests on leaving ranks may run before they move to the others")
    p.add_argument("--operation-id", default=None, help="an id that makes retries idempotent")
    p.add_argument("--status", action="store_true", help="print the scaling status and exit")
    return p


def scale_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import httpx

    if args.size is None and not args.status:
        parser.error("give the new size N, or --status")
    headers = {"Authorization": f"Bearer {args.admin_api_key}"} if args.admin_api_key else {}
    url = args.url.rstrip("/") + "/scale"
    try:
        if args.status:
            response = httpx.get(url, timeout=30)
        else:
            body: dict[str, Any] = {"new_data_parallel_size": args.size}
            if args.drain_timeout is not None:
                body["drain_timeout"] = args.drain_timeout
            if args.operation_id is not None:
                body["operation_id"] = args.operation_id
            response = httpx.post(url, json=body, headers=headers, timeout=_TIMEOUT_S)
    except httpx.HTTPError as e:
        print(f"elastic scale: cannot reach {url}: {e}", file=sys.stderr)
        return 2
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": response.text}
    json.dump(payload, sys.stdout, indent=2)
    print()
    if response.status_code != 200:
        return 2 if response.status_code < 500 else 1
    return 0 if args.status or payload.get("result") in ("succeeded", "noop") else 1
