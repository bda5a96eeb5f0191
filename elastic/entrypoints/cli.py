"""`elastic` command line: `elastic serve [MODEL] ...` starts the OpenAI-compatible server.

Parsing stays import-light (no torch), so `--help` is instant; the EngineConfig is built once, here, and
passed down read-only.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from elastic.autoscale.cli import add_autoscale_parser
from elastic.entrypoints.scale_cli import add_scale_parser

DEMO_SERVED_NAME = "elastic-demo"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if any(action.default is v for v in (None, False, True)) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def _add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Flags come from the config sections' option fields: each option is declared once, there."""
    from elastic.config.engine import CacheConfig, EplbConfig, ModelConfig, ParallelConfig, SchedulerConfig
    from elastic.config.options import add_cli_options
    from elastic.config.server import ServerConfig

    p = subparsers.add_parser(
        "serve", help="start the OpenAI-compatible API server",
        description="Start an OpenAI-compatible API server (API process + engine core process). "
                    "With no MODEL, the built-in demo model is created on first use and served.",
        formatter_class=_HelpFormatter)
    p.set_defaults(handler=serve, command_parser=p)
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="local Hugging Face checkpoint directory (default: the built-in demo model)")
    add_cli_options(p, ServerConfig, "HTTP server")
    add_cli_options(p, ModelConfig, "model")
    add_cli_options(p, CacheConfig, "KV cache")
    add_cli_options(p, SchedulerConfig, "scheduler")
    add_cli_options(p, ParallelConfig, "data and expert parallelism")
    add_cli_options(p, EplbConfig, "expert load balancing (EPLB)")
    return p


def make_parser() -> argparse.ArgumentParser:
    import elastic

    parser = argparse.ArgumentParser(
        prog="elastic", description="elastic: a serving engine for Mixture-of-Experts LLMs.",
        epilog="Start with 'elastic serve' (serves a small built-in demo model), then e.g.\n"
               "  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"model\": \"elastic-demo\", \"prompt\": \"Hello\", \"max_tokens\": 16}'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"elastic {elastic.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve_parser(subparsers)
    add_scale_parser(subparsers)  # `elastic scale N --url URL`: POST /scale from a shell
    add_autoscale_parser(subparsers)  # `elastic autoscale --url URL --min N --max M`: the scaling policy
    return parser


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import multiprocessing

    from elastic.logger import setup_logging

    multiprocessing.current_process().name = "APIServer"
    setup_logging(args.log_level)
    log = logging.getLogger("elastic.serve")
    model, served = args.model, args.served_model_name
    if model is None:
        from elastic.demo import ensure_demo_model

        model = str(ensure_demo_model())
        served = served or DEMO_SERVED_NAME
        log.info("serving the built-in demo model from %s as %r", model, served)
    from elastic.config.engine import ENGINE_SECTIONS, create_engine_config
    from elastic.config.options import cli_values
    from elastic.config.server import ServerConfig
    from elastic.entrypoints.api_server import run_server

    options = {k: v for cls in ENGINE_SECTIONS for k, v in cli_values(args, cls).items()}
    options["served_model_name"] = served or args.model
    try:
        config = create_engine_config(model, **options)
        server_config = ServerConfig(**cli_values(args, ServerConfig))
    except (ValueError, FileNotFoundError, OSError) as e:
        parser.error(str(e))  # exits 2 with the usage line
    try:
        from elastic.transport.security import load_key_file

        load_key_file(config.parallel.data_parallel_key_file)  # into the environment: child processes inherit it
    except (OSError, ValueError) as e:
        parser.error(f"--data-parallel-key-file: {e}")
    if config.parallel.headless:  # engine ranks only, for a head elsewhere (docs/deployment.md)
        from elastic.cluster.headless import run_headless

        return run_headless(config, server_config.log_level)
    if server_config.api_server_count > 1:
        from elastic.entrypoints.multi_server import run_multi_server

        return run_multi_server(config, server_config)
    return run_server(config, server_config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args, args.command_parser)


if __name__ == "__main__":
    sys.exit(main())
