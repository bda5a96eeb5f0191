"""`elastic autoscale`: keep a running server's data-parallel size between --min and --max, following its load.

    elastic autoscale --url http://127.0.0.1:8000 --min 1 --max 4 --admin-api-key KEY
    elastic autoscale --url http://127.0.0.1:8000 --min 1 --max 4 --dry-run     # print decisions, change nothing
Runs until SIGTERM / Ctrl-C (exit 0); exits 2 when the admin key is refused. A client tool: plain argparse,
nothing of the engine is imported.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

# (flag, PolicyConfig field, help). Defaults come from PolicyConfig, so they are written once.
_POLICY_FLAGS = [
    ("--up-waiting-per-rank", "up_waiting_per_rank", "queued requests per rank that count as queueing"),
    ("--up-kv-usage", "up_kv_usage", "KV-cache usage (0-1) of the fullest engine that counts as hot"),
    ("--ttft-target", "ttft_target_s", "seconds: a TTFT quantile above this counts as hot (default: off)"),
    ("--tpot-target", "tpot_target_s", "seconds: an inter-token latency quantile above this counts as hot "
                                       "(default: off)"),
    ("--latency-quantile", "latency_quantile", "the quantile compared with --ttft-target / --tpot-target"),
    ("--up-sustain", "up_sustain_s", "seconds the server must stay hot before a scale-up"),
    ("--up-hot-fraction", "up_hot_fraction", "share of the samples in --up-sustain that must be hot"),
    ("--up-cooldown", "up_cooldown_s", "seconds at a size before scaling up again"),
    ("--up-max-factor", "up_max_factor", "a scale-up multiplies the ranks by at most this"),
    ("--down-quiet", "down_quiet_s", "seconds the server must stay quiet before a scale-down (one rank)"),
    ("--down-cooldown", "down_cooldown_s", "seconds at a size before scaling down"),
    ("--down-kv-usage", "down_kv_usage", "KV-cache usage under which the server may count as quiet"),
    ("--down-utilization", "down_utilization", "a scale-down leaves the survivors at most this busy"),
    ("--capacity-per-rank", "capacity_per_rank", "requests one rank runs at once, e.g. its --max-num-seqs "
                                                 "(default: learned while requests queue; unknown: scale down "
                                                 "only when idle)"),
]


def add_autoscale_parser(subparsers: Any) -> argparse.ArgumentParser:
    from elastic.autoscale.config import ControllerConfig  # not the controller: it needs httpx
    from elastic.autoscale.policy import PolicyConfig

    p = subparsers.add_parser(
        "autoscale", help="resize a running server with its load (reads /metrics, calls POST /scale)",
        description="Scale a running `elastic serve` between --min and --max data-parallel ranks from its "
                    "/metrics: up fast on sustained queueing, KV pressure or latency over target; down one rank "
                    "at a time after a quiet cool-down. Each decision is logged with its reason.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(handler=autoscale_command, command_parser=p)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--min", dest="min_size", type=int, required=True, metavar="N", help="fewest ranks")
    p.add_argument("--max", dest="max_size", type=int, required=True, metavar="M", help="most ranks")
    p.add_argument("--admin-api-key", default=os.environ.get("ELASTIC_ADMIN_API_KEY"),
                   help="the server's --admin-api-key (default: $ELASTIC_ADMIN_API_KEY)")
    p.add_argument("--dry-run", action="store_true", help="print each decision; never call POST /scale")
    c = ControllerConfig()
    p.add_argument("--interval", dest="interval_s", type=float, metavar="S", default=c.interval_s,
                   help="seconds between scrapes")
    p.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, metavar="S", default=None,
                   help="scale-down: seconds requests on leaving ranks may run before they move")
    p.add_argument("--failure-backoff", dest="failure_backoff_s", type=float, metavar="S", default=c.failure_backoff_s,
                   help="seconds without a new scale after one rolled back, failed or was refused")
    p.add_argument("--scale-timeout", dest="scale_timeout_s", type=float, metavar="S", default=c.scale_timeout_s,
                   help="seconds one POST /scale may take before it is retried (same operation id)")
    g = p.add_argument_group("policy")
    defaults = PolicyConfig()
    for flag, field, help_text in _POLICY_FLAGS:
        g.add_argument(flag, dest=field, type=float, default=getattr(defaults, field), help=help_text,
                       metavar="S" if field.endswith("_s") else "X")
    p.add_argument("--log-level", default="INFO", help="DEBUG logs every decision, INFO those that change")
    return p


def build_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """(PolicyConfig, ControllerConfig) from parsed flags; ValueError for an inconsistent policy."""
    from elastic.autoscale.config import ControllerConfig
    from elastic.autoscale.policy import PolicyConfig

    policy = PolicyConfig(min_size=args.min_size, max_size=args.max_size,
                          **{field: getattr(args, field) for _, field, _ in _POLICY_FLAGS})
    names = {f.name for f in dataclasses.fields(ControllerConfig)}
    controller = ControllerConfig(**{k: v for k, v in vars(args).items() if k in names})
    return policy, controller


def autoscale_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from elastic.autoscale.controller import Autoscaler, AutoscaleAuthError, ServerClient
    from elastic.logger import setup_logging

    try:
        policy, controller = build_configs(args)
    except ValueError as e:
        parser.error(str(e))
    setup_logging(args.log_level)
    if not args.dry_run and not args.admin_api_key:
        parser.error("scaling needs the server's admin key: --admin-api-key or $ELASTIC_ADMIN_API_KEY "
                     "(or --dry-run)")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # the current tick ends (an operation in flight is awaited by the server anyway)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    echo = (lambda line: print(line, flush=True)) if args.dry_run else None
    client = ServerClient(args.url, args.admin_api_key, controller.scrape_timeout_s)
    try:
        Autoscaler(client, policy, controller, stop=stop, echo=echo).run()
    except AutoscaleAuthError as e:
        print(f"elastic autoscale: {e}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 0
