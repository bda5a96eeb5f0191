"""One frozen config tree, built once (from `LLM(**kwargs)` or the CLI) and passed down read-only."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from elastic.models.arch import ModelArch, load_arch

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
LOAD_FORMATS = ("auto", "safetensors", "dummy")


@dataclass(frozen=True)
class ModelConfig:
    model: str
    tokenizer: str
    served_model_name: str
    arch: ModelArch
    dtype: torch.dtype
    max_model_len: int
    load_format: str = "auto"
    seed: int = 0
    skip_tokenizer_init: bool = False  # token ids in and out, no text (benchmarks of dummy models)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; the budget on CPU (and an override on GPU)
    num_kv_blocks: int | None = None  # exact count, overrides both budgets (tests force preemption)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192


EP_DISPATCH_MODES = ("alltoall", "allgather")


@dataclass(frozen=True)
class ParallelConfig:
    """Attention is data-parallel over `data_parallel_size` ranks; MoE layers are expert-parallel over
    all of them. `data_parallel_rank` is set per engine process when it starts."""

    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    ep_dispatch: str = "alltoall"  # how tokens reach their experts' ranks: "alltoall" | "allgather"
    num_redundant_experts: int = 0  # extra physical slots per layer, holding replicas (EPLB)
    # The rendezvous store of the stateless groups, hosted by whoever launches the ranks.
    store_host: str = "127.0.0.1"
    store_port: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.data_parallel_size > 1

    def for_rank(self, rank: int) -> ParallelConfig:
        if not 0 <= rank < self.data_parallel_size:
            raise ValueError(f"data_parallel_rank {rank} outside [0, {self.data_parallel_size})")
        return dataclasses.replace(self, data_parallel_rank=rank)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: str  # "cpu" | "cuda" | "cuda:N"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for, but no CUDA device is visible")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def create_engine_config(
    model: str,
    *,
    tokenizer: str | None = None,
    served_model_name: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    max_model_len: int | None = None,
    load_format: str = "auto",
    seed: int = 0,
    skip_tokenizer_init: bool = False,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    kv_cache_memory: int | None = None,
    num_kv_blocks: int | None = None,
    enable_prefix_caching: bool = True,
    enforce_eager: bool = False,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int | None = None,
    data_parallel_size: int = 1,
    ep_dispatch: str = "alltoall",
    num_redundant_experts: int = 0,
) -> EngineConfig:
    """Validate engine arguments once; every error names the argument."""
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model {model!r} is not a local checkpoint directory")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    arch = load_arch(model)
    device = resolve_device(device)
    if max_model_len is None:
        max_model_len = min(arch.max_position_embeddings, 32768)
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be positive, got {max_model_len}")
    if max_num_batched_tokens is None:
        max_num_batched_tokens = max(8192, max_num_seqs)
    if max_num_seqs < 1 or max_num_batched_tokens < 1:
        raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if block_size not in (8, 16, 32, 64, 128):
        raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128; got {block_size}")
    if num_kv_blocks is not None and num_kv_blocks * block_size < 2 * block_size:
        raise ValueError(f"num_kv_blocks={num_kv_blocks} is too small")
    if data_parallel_size < 1:
        raise ValueError(f"data_parallel_size must be at least 1, got {data_parallel_size}")
    if ep_dispatch not in EP_DISPATCH_MODES:
        raise ValueError(f"ep_dispatch must be one of {EP_DISPATCH_MODES}, got {ep_dispatch!r}")
    if (arch.num_experts + num_redundant_experts) % data_parallel_size:
        raise ValueError(f"{arch.num_experts} experts + {num_redundant_experts} redundant do not split evenly "
                         f"over data_parallel_size={data_parallel_size}; set num_redundant_experts so they do")
    return EngineConfig(
        model=ModelConfig(
            model=str(model), tokenizer=str(tokenizer or model),
            served_model_name=served_model_name or str(model), arch=arch,
            dtype=resolve_dtype(dtype, device), max_model_len=max_model_len,
            load_format=load_format, seed=seed, skip_tokenizer_init=skip_tokenizer_init),
        cache=CacheConfig(block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
                          kv_cache_memory=kv_cache_memory, num_kv_blocks=num_kv_blocks,
                          enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
        parallel=ParallelConfig(data_parallel_size=data_parallel_size, ep_dispatch=ep_dispatch,
                                num_redundant_experts=num_redundant_experts),
        device=device,
    )

