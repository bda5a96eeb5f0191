"""One frozen config tree, built once (from `LLM(**kwargs)` or the CLI) and passed down read-only.

Every user option is a field of one section below, declared with `option(...)` (default, help, choices);
its checks live in that section's `__post_init__`, and checks that span sections in `EngineConfig`'s.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elastic.config.model_arch import ModelArch, load_arch
from elastic.config.options import check_choice, option, option_names, parse_size, parse_tokens

if TYPE_CHECKING:  # torch is imported where it is needed: parsing the CLI stays instant
    import torch

_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
           "half": "float16"}  # name -> torch attribute
LOAD_FORMATS = ("auto", "safetensors", "dummy")
EP_DISPATCH_MODES = ("auto", "alltoall", "allgather", "p2p")
DP_BACKENDS = ("mp", "ray")
BLOCK_SIZES = (8, 16, 32, 64, 128)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses resolve their derived values once, here


@dataclass(frozen=True)
class ModelConfig:
    model: str  # local checkpoint directory (the CLI's positional MODEL)
    tokenizer: str | None = option(None, "tokenizer directory (default: MODEL)")
    served_model_name: str | None = option(
        None, "model name in the API (default: MODEL, or 'elastic-demo' for the demo)")
    dtype: str | torch.dtype = option(
        "auto", "weight and activation dtype (auto: bfloat16 on GPU, float32 on CPU)",
        choices=("auto", "bfloat16", "float16", "half", "float32", "float"))
    load_format: str = option("auto", "'dummy': random weights at the real shapes (benchmarks)",
                              choices=LOAD_FORMATS)
    max_model_len: int | None = option(
        None, "context length in tokens, e.g. 4096 or 32k (default: the model's, at most 32k)", parse=parse_tokens)
    seed: int = option(0, "seed of the engine's sampler")
    skip_tokenizer_init: bool = option(
        False, "no tokenizer: token-id prompts only, outputs carry token_ids (dummy-weight benchmarks)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    dummy_router_zipf: float = option(
        0.0, "with --load-format dummy: skew each MoE layer's routing by a Zipf law of this exponent (EPLB "
             "benchmarks; 0: off)")
    arch: ModelArch = field(init=False, repr=False)  # parsed from config.json

    def __post_init__(self) -> None:
        if not Path(self.model).is_dir():
            raise FileNotFoundError(f"model {self.model!r} is not a local checkpoint directory")
        check_choice("load_format", self.load_format, LOAD_FORMATS)
        _set(self, "model", str(self.model))
        _set(self, "device", resolve_device(self.device))
        _set(self, "dtype", resolve_dtype(self.dtype, self.device))
        _set(self, "arch", load_arch(self.model))
        _set(self, "tokenizer", str(self.tokenizer or self.model))
        _set(self, "served_model_name", self.served_model_name or self.model)
        if self.max_model_len is None:
            _set(self, "max_model_len", min(self.arch.max_position_embeddings, 32768))
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.dummy_router_zipf < 0 or (self.dummy_router_zipf and self.load_format != "dummy"):
            raise ValueError("dummy_router_zipf must be >= 0 and needs load_format='dummy'")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = option(16, "tokens per KV cache block", choices=BLOCK_SIZES)
    gpu_memory_utilization: float = option(
        0.9, "fraction of GPU memory the engine may use (weights, activations, KV cache)")
    kv_cache_memory: int | None = option(
        None, "KV cache budget in bytes, e.g. 4GiB (CPU default: up to 1GiB)", parse=parse_size)
    num_kv_blocks: int | None = option(None, "exact KV block count (overrides budgets)")
    enable_prefix_caching: bool = option(True, "disable reuse of cached prompt prefixes",
                                         negative_flag="--no-enable-prefix-caching")
    enforce_eager: bool = option(False, "never use CUDA graphs")
    mixed_step_graphs: bool = option(True, "no CUDA graphs for steps with prompt tokens (they run eagerly; "
                                     "decode steps keep theirs)", negative_flag="--no-mixed-step-graphs")

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        check_choice("block_size", self.block_size, BLOCK_SIZES)
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} is too small")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = option(256, "most sequences in one batch")
    max_num_batched_tokens: int | None = option(
        None, "token budget of one step (default: max(8192, max-num-seqs))")
    async_scheduling: bool | None = option(
        None, "launch each decode step before the previous one's tokens are read, so the host's work per step "
        "overlaps the device's (steady decode without logprobs or penalties; data parallel ranks too). "
        "Default: on with CUDA (--no-async-scheduling: off); on the CPU, where it gains nothing, off")

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is None:
            _set(self, "max_num_batched_tokens", max(8192, self.max_num_seqs))
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")

    @property
    def max_graph_batch(self) -> int:
        """Largest decode batch captured in a CUDA graph."""
        return min(self.max_num_seqs, 512)

    @property
    def max_step_tokens(self) -> int:
        """Most tokens one rank's step can hold: every decode batch a graph replays and every step the scheduler
        may build (what the peer-to-peer EP exchange is asked to hold; its buffer budget may cap it)."""
        return max(self.max_graph_batch, self.max_num_batched_tokens)  # type: ignore[type-var]


@dataclass(frozen=True)
class ParallelConfig:
    """Attention is data-parallel over `data_parallel_size` ranks; MoE layers are expert-parallel over
    all of them. `data_parallel_rank` and the store address are set per engine process when it starts (the
    launcher hands this same object to each engine in the handshake)."""

    data_parallel_size: int = option(
        1, "engine-core processes (ranks), one per GPU; attention is data-parallel over them and MoE layers "
           "expert-parallel", flags=("--data-parallel-size", "-dp"))
    data_parallel_rank: int = 0
    enable_expert_parallel: bool = option(
        False, "accepted for vLLM compatibility: MoE layers are always expert-parallel over the ranks")
    ep_dispatch: str = option(
        "auto", "how tokens reach their experts' ranks: all-to-all; all-gather + reduce-scatter (NCCL); or p2p, "
                "the all-gather's data flow through peer-mapped buffers with device-side barriers (NVLink, ranks "
                "of one host; NCCL all-gather for prefill steps and across hosts). auto: p2p on CUDA, else "
                "all-to-all",
        choices=EP_DISPATCH_MODES)
    num_redundant_experts: int = option(
        0, "extra expert slots per MoE layer holding replicas (EPLB places them; slots per rank are "
           "ceil((experts + redundant) / ranks))")
    max_data_parallel_size: int | None = option(
        None, "largest size POST /scale may grow to (default: the GPUs from the first device on; no limit on "
              "CPU)")
    standby_engines: int | None = option(
        None, "engine processes kept started on this host's spare GPUs, each prewarmed for the layout it will most "
              "likely join (model built, KV sized, kernels compiled), so a scale-up skips that start-up (default: "
              "one per spare GPU up to --max-data-parallel-size on CUDA; none on CPU; 0: none)")
    scale_phase_timeout: float = option(
        120.0, "seconds each phase of a POST /scale (prepare, commit) may take before the scale rolls back")
    # Beyond one machine (docs/deployment.md): which ranks this process runs, and how it reaches the head.
    data_parallel_address: str | None = option(
        None, "the head node's address: engines and front ends use tcp:// on it (default: ipc sockets, one host)")
    data_parallel_rpc_port: int = option(0, "the head's handshake port (tcp; 0: any free port, single host only)")
    data_parallel_size_local: int | None = option(
        None, "ranks this node runs (default: all of them; with --headless: from --data-parallel-start-rank on)")
    data_parallel_start_rank: int = option(0, "first rank this node runs (headless and hybrid-LB nodes)")
    headless: bool = option(False, "run engine ranks only, no API server: they join the head at "
                                   "--data-parallel-address:--data-parallel-rpc-port")
    data_parallel_external_rank: int | None = option(
        None, "external load balancing: this server runs rank R alone (its own HTTP endpoint); rank 0 also hosts "
              "the coordinator; a rank >= the running size joins (the group grows)",
        flags=("--data-parallel-rank",))
    data_parallel_hybrid_lb: bool = option(
        False, "hybrid load balancing: one API server per node, balancing over that node's ranks")
    data_parallel_backend: str = option("mp", "how engine ranks are started: local processes, or Ray actors",
                                        choices=DP_BACKENDS)
    data_parallel_key_file: str | None = option(
        None, "file holding the secret every node shares (authenticates and encrypts the tcp sockets); or set "
              "ELASTIC_DATA_PARALLEL_KEY")
    restart_failed_ranks: bool = option(
        True, "when a rank dies, start a replacement and grow back to the size before the failure (the "
              "survivors serve meanwhile; a single engine is restarted); off: serve on with the survivors",
        negative_flag="--no-restart-failed-ranks")
    # The rendezvous store of the stateless groups, hosted by whoever launches the ranks.
    store_host: str = "127.0.0.1"
    store_port: int = 0

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be at least 1, got {self.data_parallel_size}")
        check_choice("ep_dispatch", self.ep_dispatch, EP_DISPATCH_MODES)
        if self.num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts must be >= 0, got {self.num_redundant_experts}")
        if self.max_data_parallel_size is not None and self.max_data_parallel_size < self.data_parallel_size:
            raise ValueError(f"max_data_parallel_size={self.max_data_parallel_size} is below data_parallel_size="
                             f"{self.data_parallel_size}")
        if self.standby_engines is not None and self.standby_engines < 0:
            raise ValueError(f"standby_engines must be >= 0, got {self.standby_engines}")
        if self.scale_phase_timeout <= 0:
            raise ValueError(f"scale_phase_timeout must be positive, got {self.scale_phase_timeout}")
        _check_node_options(self)

    @property
    def is_distributed(self) -> bool:
        return self.data_parallel_size > 1

    @property
    def local_ranks(self) -> range:
        """The ranks this node starts (external LB: its one rank)."""
        if self.data_parallel_external_rank is not None:
            return range(self.data_parallel_external_rank, self.data_parallel_external_rank + 1)
        start = self.data_parallel_start_rank
        local = self.data_parallel_size_local
        return range(start, self.data_parallel_size if local is None else start + local)

    @property
    def is_head(self) -> bool:
        """This node hosts the handshake, the groups' store and the coordinator (rank 0's node)."""
        return not self.headless and self.local_ranks.start == 0

    @property
    def local_load_balancing(self) -> bool:
        """Each API server routes to its own node's ranks only (external or hybrid LB)."""
        return self.data_parallel_external_rank is not None or self.data_parallel_hybrid_lb

    def for_rank(self, rank: int) -> ParallelConfig:
        if not 0 <= rank < self.data_parallel_size:
            raise ValueError(f"data_parallel_rank {rank} outside [0, {self.data_parallel_size})")
        return dataclasses.replace(self, data_parallel_rank=rank)


@dataclass(frozen=True)
class EplbConfig:
    """Expert-parallel load balancing: record each physical expert's load over a window of steps and, every
    interval, re-place experts (and their redundant replicas) across the ranks, moving only changed slots."""

    enable_eplb: bool = option(False, "re-place experts across the ranks by their recorded load (EPLB)")
    eplb_window_size: int = option(1000, "steps of expert load the placement is computed from")
    eplb_step_interval: int = option(3000, "steps between two rebalances")
    eplb_log_balancedness: bool = option(False, "log the balancedness (mean/max tokens per rank) at each rebalance")
    eplb_min_gain: float = option(0.01, "skip a rebalance whose predicted balancedness gain is below this")
    eplb_config: str | None = option(
        None, "the EPLB options as JSON, vLLM's keys: window_size, step_interval, num_redundant_experts, "
              "log_balancedness (and min_gain)")

    def __post_init__(self) -> None:
        if self.eplb_window_size < 1 or self.eplb_step_interval < 1:
            raise ValueError("eplb_window_size and eplb_step_interval must be at least 1")
        if not 0.0 <= self.eplb_min_gain < 1.0:
            raise ValueError(f"eplb_min_gain must be in [0, 1), got {self.eplb_min_gain}")


def _check_node_options(p: ParallelConfig) -> None:
    """The multi-node options agree with each other (docs/deployment.md)."""
    check_choice("data_parallel_backend", p.data_parallel_backend, DP_BACKENDS)
    if not 0 <= p.data_parallel_rpc_port < 65536:
        raise ValueError(f"data_parallel_rpc_port must be in [0, 65535], got {p.data_parallel_rpc_port}")
    ranks, size = p.local_ranks, p.data_parallel_size
    if p.data_parallel_external_rank is not None:
        if p.headless or p.data_parallel_hybrid_lb or p.data_parallel_size_local not in (None, 1):
            raise ValueError("--data-parallel-rank (external LB) runs one rank: it excludes --headless, "
                             "--data-parallel-hybrid-lb and --data-parallel-size-local > 1")
        if p.data_parallel_external_rank < 0:
            raise ValueError(f"--data-parallel-rank must be >= 0, got {p.data_parallel_external_rank}")
    elif not (0 <= ranks.start and len(ranks) >= 1 and ranks.stop <= size):
        raise ValueError(f"ranks {ranks.start}..{ranks.stop - 1} (--data-parallel-start-rank, "
                         f"--data-parallel-size-local) do not fit in --data-parallel-size {size}")
    remote = p.headless or p.local_ranks != range(size) or p.local_load_balancing
    if remote and (p.data_parallel_address is None or not p.data_parallel_rpc_port):
        raise ValueError("ranks on several nodes need --data-parallel-address (the head's address) and "
                         "--data-parallel-rpc-port (the head's handshake port) on every node")
    if p.headless and ranks.start == 0:
        raise ValueError("--headless nodes run ranks after the head's: give --data-parallel-start-rank")
    if p.data_parallel_backend == "ray" and p.data_parallel_address is None:
        raise ValueError("--data-parallel-backend ray needs --data-parallel-address: the address Ray's actors reach "
                         "this node at")
    if p.data_parallel_backend == "ray" and (remote or p.local_load_balancing):
        raise ValueError("--data-parallel-backend ray places every rank itself: it excludes --headless, "
                         "--data-parallel-rank, --data-parallel-hybrid-lb and --data-parallel-size-local")


_EPLB_JSON_KEYS = {"window_size": "eplb_window_size", "step_interval": "eplb_step_interval",
                   "log_balancedness": "eplb_log_balancedness", "min_gain": "eplb_min_gain",
                   "num_redundant_experts": "num_redundant_experts"}


def _expand_eplb_config(options: dict[str, Any]) -> dict[str, Any]:
    """`eplb_config` JSON (or a dict) -> the flat options it stands for; a key set both ways must agree."""
    raw = options.get("eplb_config")
    if raw is None:
        return options
    try:
        values = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"eplb_config is not a JSON object: {e}") from None
    unknown = set(values) - set(_EPLB_JSON_KEYS)
    if unknown:
        raise ValueError(f"eplb_config: unknown key(s) {sorted(unknown)}; known: {sorted(_EPLB_JSON_KEYS)}")
    out = {k: v for k, v in options.items() if k != "eplb_config"}
    for key, value in values.items():
        name = _EPLB_JSON_KEYS[key]
        if name in out and out[name] != value and out[name] != _default(name):
            raise ValueError(f"eplb_config sets {key}={value!r} but {name}={out[name]!r} was also given")
        out[name] = value
    return out


def _default(name: str) -> Any:
    return next(f.default for cls in ENGINE_SECTIONS for f in dataclasses.fields(cls) if f.name == name)


ENGINE_SECTIONS = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig, EplbConfig)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    eplb: EplbConfig = EplbConfig()

    def __post_init__(self) -> None:
        if self.scheduler.async_scheduling is None:  # pipelining hides host time only behind an async device
            _set(self, "scheduler", dataclasses.replace(self.scheduler,
                                                        async_scheduling=self.model.device.startswith("cuda")))
        if self.parallel.ep_dispatch == "auto":  # resolved once, so every rank and every scale agree
            _set(self, "parallel", dataclasses.replace(self.parallel,
                                                       ep_dispatch=_auto_dispatch(self.model)))

    @property
    def device(self) -> str:  # "cpu" | "cuda" | "cuda:N"
        return self.model.device

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for, but no CUDA device is visible")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return getattr(torch, _DTYPES[dtype])


def engine_option_names() -> set[str]:
    """Every keyword `LLM(...)` / `create_engine_config` accepts besides `model`."""
    return option_names(*ENGINE_SECTIONS)


def create_engine_config(model: str, **options: Any) -> EngineConfig:
    """Build and validate the tree from option keywords; every error names the option."""
    unknown = set(options) - engine_option_names()
    if unknown:
        raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
    options = _expand_eplb_config(options)

    def pick(cls: type) -> dict[str, Any]:
        return {k: v for k, v in options.items() if k in option_names(cls)}

    return EngineConfig(model=ModelConfig(str(model), **pick(ModelConfig)), cache=CacheConfig(**pick(CacheConfig)),
                        scheduler=SchedulerConfig(**pick(SchedulerConfig)),
                        parallel=ParallelConfig(**pick(ParallelConfig)), eplb=EplbConfig(**pick(EplbConfig)))


def _auto_dispatch(model: ModelConfig) -> str:
    """p2p on CUDA: no host sync, so decode steps replay CUDA graphs (all-to-all needs its split sizes on the
    host every layer: measured 4-5x slower serving on 2 H100s), and fewer, smaller launches than NCCL's
    all-gather (docs/distributed.md). On the CPU all-to-all, which moves only the tokens a rank needs."""
    return "p2p" if model.device.startswith("cuda") else "alltoall"
