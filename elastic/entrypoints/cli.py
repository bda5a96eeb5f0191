"""`elastic` command line: `elastic serve [MODEL] ...` starts the OpenAI-compatible server.

Parsing stays import-light (no torch), so `--help` is instant; the EngineConfig is built once, here, and
passed down read-only.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Any, Sequence

DEMO_SERVED_NAME = "elastic-demo"

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10, "m": 10**6, "mb": 10**6, "mi": 2**20,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30, "t": 10**12, "tb": 10**12, "ti": 2**40,
          "tib": 2**40}


def _size(text: str) -> int:
    """'4GiB', '512MiB', '1e9' style byte counts."""
    m = _SIZE.match(text)
    if not m or m.group(2) is None and not m.group(1):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 1000000000)")
    unit = (m.group(2) or "").lower()
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"unknown unit in {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def _tokens(text: str) -> int:
    """Token counts like 4096, 32k, 1M."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096, 32k)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if any(action.default is v for v in (None, False, True)) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def _add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="start the OpenAI-compatible API server",
        description="Start an OpenAI-compatible API server (API process + engine core process). "
                    "With no MODEL, the built-in demo model is created on first use and served.",
        formatter_class=_HelpFormatter)
    p.set_defaults(handler=serve, command_parser=p)
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="local Hugging Face checkpoint directory (default: the built-in demo model)")

    http = p.add_argument_group("HTTP server")
    http.add_argument("--host", default="0.0.0.0", help="address to listen on")
    http.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    http.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    http.add_argument("--served-model-name", default=None,
                      help="model name in the API (default: MODEL, or 'elastic-demo' for the demo)")
    http.add_argument("--shutdown-timeout", type=float, default=10.0,
                      help="seconds in-flight requests get to finish on SIGTERM / Ctrl-C")
    http.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per HTTP request")
    http.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                      help="log level of the API server and engine processes")

    model = p.add_argument_group("model")
    model.add_argument("--tokenizer", default=None, help="tokenizer directory (default: MODEL)")
    model.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "half", "float32", "float"],
                       help="weight and activation dtype (auto: bfloat16 on GPU, float32 on CPU)")
    model.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                       help="'dummy': random weights at the real shapes (benchmarks)")
    model.add_argument("--max-model-len", type=_tokens, default=None,
                       help="context length in tokens, e.g. 4096 or 32k (default: the model's, at most 32k)")
    model.add_argument("--seed", type=int, default=0, help="seed of the engine's sampler")
    model.add_argument("--skip-tokenizer-init", action="store_true",
                       help="no tokenizer: token-id prompts only, outputs carry token_ids (dummy-weight benchmarks)")

    engine = p.add_argument_group("engine")
    engine.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    engine.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget of one step (default: max(8192, max-num-seqs))")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory the engine may use (weights, activations, KV cache)")
    engine.add_argument("--kv-cache-memory", type=_size, default=None,
                        help="KV cache budget in bytes, e.g. 4GiB (CPU default: up to 1GiB)")
    engine.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV block count (overrides budgets)")
    engine.add_argument("--block-size", type=int, default=16, choices=[8, 16, 32, 64, 128],
                        help="tokens per KV cache block")
    engine.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                        help="disable reuse of cached prompt prefixes")
    engine.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs")

    par = p.add_argument_group("data and expert parallelism")
    par.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                     help="engine-core processes (ranks), one per GPU; attention is data-parallel over them and "
                          "MoE layers expert-parallel")
    par.add_argument("--enable-expert-parallel", action="store_true",
                     help="accepted for vLLM compatibility: MoE layers are always expert-parallel over the ranks")
    par.add_argument("--ep-dispatch", default="alltoall", choices=["alltoall", "allgather"],
                     help="how tokens reach their experts' ranks: all-to-all, or all-gather + reduce-scatter")
    par.add_argument("--num-redundant-experts", type=int, default=0,
                     help="extra expert slots per MoE layer holding replicas (experts + redundant must split "
                          "evenly over the ranks)")
    par.add_argument("--api-server-count", type=int, default=1,
                     help="API server processes sharing the HTTP port, each connected to every engine")

    dp = p.add_argument_group("engine transport")
    dp.add_argument("--data-parallel-address", default=None,
                    help="use tcp:// on this address between API server and engines (default: ipc sockets)")
    dp.add_argument("--data-parallel-rpc-port", type=int, default=0,
                    help="handshake port when using tcp (0: any free port)")
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
    from elastic.config import create_engine_config
    from elastic.entrypoints.api_server import ServerArgs, run_server

    try:
        config = create_engine_config(
            model, tokenizer=args.tokenizer, served_model_name=served or args.model, dtype=args.dtype,
            device=args.device, max_model_len=args.max_model_len, load_format=args.load_format, seed=args.seed,
            skip_tokenizer_init=args.skip_tokenizer_init,
            block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_memory=args.kv_cache_memory, num_kv_blocks=args.num_kv_blocks,
            enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, data_parallel_size=args.data_parallel_size,
            ep_dispatch=args.ep_dispatch, num_redundant_experts=args.num_redundant_experts)
    except (ValueError, FileNotFoundError, OSError) as e:
        parser.error(str(e))  # exits 2 with the usage line
    if args.api_server_count < 1:
        parser.error(f"--api-server-count must be at least 1, got {args.api_server_count}")
    server_args = ServerArgs(
        host=args.host, port=args.port, api_key=args.api_key, log_level=args.log_level,
        access_log=not args.disable_uvicorn_access_log, shutdown_timeout=args.shutdown_timeout,
        data_parallel_address=args.data_parallel_address, data_parallel_rpc_port=args.data_parallel_rpc_port,
        api_server_count=args.api_server_count)
    return run_server(config, server_args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args, args.command_parser)


if __name__ == "__main__":
    sys.exit(main())
