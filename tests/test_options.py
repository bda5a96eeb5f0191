"""Each option is defined once (a config field): the CLI flags and `LLM(...)` keywords come from it and agree."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
from checkpoints import make_checkpoint

from elastic.config.engine import ENGINE_SECTIONS, ModelConfig, create_engine_config, engine_option_names
from elastic.config.options import cli_values, option_fields
from elastic.config.server import ServerConfig
from elastic.entrypoints.cli import make_parser

# `elastic serve` flags before options were generated from the config (issue 17): none may go missing.
FLAGS_BEFORE = {
    "--host", "--port", "--api-key", "--served-model-name", "--shutdown-timeout", "--disable-uvicorn-access-log",
    "--log-level", "--tokenizer", "--dtype", "--load-format", "--max-model-len", "--seed", "--skip-tokenizer-init",
    "--device", "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization", "--kv-cache-memory",
    "--num-kv-blocks", "--block-size", "--no-enable-prefix-caching", "--enforce-eager", "--data-parallel-size",
    "-dp", "--enable-expert-parallel", "--ep-dispatch", "--num-redundant-experts", "--api-server-count",
    "--data-parallel-address", "--data-parallel-rpc-port",
}


def _serve_parser() -> argparse.ArgumentParser:
    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def _flags_by_dest() -> dict[str, list[str]]:
    return {a.dest: a.option_strings for a in _serve_parser()._actions if a.option_strings}


def test_serve_lists_every_flag_it_had() -> None:
    flags = {f for strings in _flags_by_dest().values() for f in strings}
    assert FLAGS_BEFORE <= flags, f"missing: {sorted(FLAGS_BEFORE - flags)}"


def test_every_option_field_is_a_flag_and_every_flag_an_option() -> None:
    dests = set(_flags_by_dest()) - {"help"}
    options = engine_option_names() | {f.name for f in option_fields(ServerConfig)}
    assert dests == options


def test_cli_defaults_are_the_field_defaults() -> None:
    args = _serve_parser().parse_args([])
    for cls in (*ENGINE_SECTIONS, ServerConfig):
        for f in option_fields(cls):
            assert getattr(args, f.name) == f.default, f.name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("ckpt")))


def test_cli_and_llm_keywords_build_the_same_config(checkpoint: str) -> None:
    argv = [checkpoint, "--max-model-len", "2k", "--kv-cache-memory", "64MiB", "--block-size", "32",
            "--no-enable-prefix-caching", "--max-num-seqs", "8", "--dtype", "float32", "--device", "cpu",
            "--seed", "7", "--ep-dispatch", "allgather"]
    args = _serve_parser().parse_args(argv)
    from_cli = create_engine_config(args.model, **{k: v for cls in ENGINE_SECTIONS
                                                   for k, v in cli_values(args, cls).items()})
    from_kwargs = create_engine_config(checkpoint, max_model_len=2048, kv_cache_memory=64 * 2**20, block_size=32,
                                       enable_prefix_caching=False, max_num_seqs=8, dtype="float32", device="cpu",
                                       seed=7, ep_dispatch="allgather")
    assert from_cli == from_kwargs
    assert from_cli.scheduler.max_num_batched_tokens == 8192  # derived once, in the section


def test_unknown_and_invalid_options_name_themselves(checkpoint: str) -> None:
    with pytest.raises(TypeError, match="max_model_length"):
        create_engine_config(checkpoint, max_model_length=10)
    with pytest.raises(ValueError, match="block_size"):
        create_engine_config(checkpoint, block_size=12)
    with pytest.raises(ValueError, match="ep_dispatch"):
        create_engine_config(checkpoint, ep_dispatch="nccl")
    with pytest.raises(SystemExit):
        _serve_parser().parse_args(["--block-size", "12"])


def test_model_config_fields_are_derived_once(checkpoint: str) -> None:
    config = create_engine_config(checkpoint, device="cpu")
    assert config.model.tokenizer == checkpoint and config.model.served_model_name == checkpoint
    assert dataclasses.replace(config.model, seed=3).arch == config.model.arch
    assert ModelConfig(checkpoint, device="cpu").max_model_len == config.model.max_model_len


def test_async_scheduling_defaults_by_device_and_parses_both_ways(checkpoint: str) -> None:
    parser = _serve_parser()
    assert parser.parse_args([]).async_scheduling is None  # unset: decided with the device
    assert parser.parse_args(["--async-scheduling"]).async_scheduling is True
    assert parser.parse_args(["--no-async-scheduling"]).async_scheduling is False
    assert create_engine_config(checkpoint, device="cpu").scheduler.async_scheduling is False
    assert create_engine_config(checkpoint, device="cpu", async_scheduling=True).scheduler.async_scheduling is True
