"""Build a model and fill it from safetensors (or with random "dummy" weights at the real shapes)."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from elastic.config import ModelConfig, ParallelConfig
from elastic.config.model_arch import ModelArch
from elastic.layers.moe import FusedMoE
from elastic.models.deepseek import DeepseekForCausalLM, DeepseekMoE
from elastic.models.moe_decoder import MoeForCausalLM, SparseMoeBlock
from elastic.models.router_skew import skew_router_

logger = logging.getLogger(__name__)

_QKV = re.compile(r"^(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$")
_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(\w+)\.weight$")
_FUSED_EXPERTS = re.compile(r"^(.*\.mlp)\.experts\.(gate_up_proj|down_proj)$")
_GATE_UP = re.compile(r"^(.*)\.(gate|up)_proj\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is malformed: {e}") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir} (only safetensors checkpoints are supported)")
    return files


def map_name(name: str, arch: ModelArch) -> tuple[str, dict[str, Any]] | None:
    """Checkpoint tensor name -> (parameter name, weight_loader kwargs); None to skip it."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if (m := _LAYER.match(name)) and int(m[1]) >= arch.num_layers:
        return None  # e.g. DeepSeek-V3's multi-token-prediction layer, which serving does not run
    if arch.moe_prefix != "mlp":
        name = name.replace(f".{arch.moe_prefix}.", ".mlp.")
    if arch.mla is None and (m := _QKV.match(name)):  # MLA's q_proj is not part of a fused qkv
        return f"{m[1]}.qkv_proj.{m[3]}", {"shard_id": "qkv".index(m[2])}
    if m := _EXPERT.match(name):
        gate, up, down = arch.expert_names
        if m[3] not in (gate, up, down):
            return None
        expert = int(m[2])
        if m[3] == down:
            return f"{m[1]}.experts.w2", {"expert_id": expert, "shard_id": None}
        return f"{m[1]}.experts.w13", {"expert_id": expert, "shard_id": 0 if m[3] == gate else 1}
    if m := _FUSED_EXPERTS.match(name):  # transformers v5 in-memory layout: [E, 2I, H] / [E, H, I]
        return f"{m[1]}.experts.{'w13' if m[2] == 'gate_up_proj' else 'w2'}", {"all_experts": True}
    if m := _GATE_UP.match(name):
        return f"{m[1]}.gate_up_proj.weight", {"shard_id": 0 if m[2] == "gate" else 1}
    return name, {}


def _iter_tensors(files: list[Path], wanted: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for names `wanted(name)` accepts, reading nothing else from disk."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if wanted(name):
                        yield name, f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"cannot read {path}: {e}") from e


def load_weights(model: MoeForCausalLM, model_dir: Path) -> None:
    arch = model.arch
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()

    def wanted(name: str) -> bool:
        mapped = map_name(name, arch)
        if mapped is None:
            return False
        param_name, kw = mapped
        if "expert_id" in kw:  # skip experts this rank does not store (expert parallelism)
            moe = modules[param_name.rsplit(".", 1)[0]]
            return isinstance(moe, FusedMoE) and moe.needs_expert(kw["expert_id"])
        return True

    files = checkpoint_files(model_dir)
    total = sum(1 for _ in _names(files))
    for name, tensor in tqdm(_iter_tensors(files, wanted), total=total, desc="Loading weights",
                             unit="tensor", leave=False):
        param_name, kw = map_name(name, arch)  # type: ignore[misc]
        param = params.get(param_name)
        if param is None:
            logger.warning("ignoring checkpoint tensor %s (no matching parameter)", name)
            continue
        if kw.pop("all_experts", False):
            for expert, expert_tensor in enumerate(tensor):
                param.weight_loader(param, expert_tensor, expert_id=expert, shard_id=None)
        else:
            try:
                param.weight_loader(param, tensor, **kw)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {name}: {e}") from None
        loaded.add(param_name)
    if arch.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {missing[:5]}")


def _names(files: list[Path]) -> Iterator[str]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                yield from f.keys()
        except Exception as e:
            raise ValueError(f"cannot read {path}: {e}") from e


def init_dummy_weights(model: MoeForCausalLM, seed: int) -> None:
    """Random weights at the real shapes, for benchmarks: norms at 1, everything else small uniform."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.uniform_(-0.02, 0.02, generator=gen)


def load_model(config: ModelConfig, parallel: ParallelConfig, device: torch.device) -> MoeForCausalLM:
    prev_dtype = torch.get_default_dtype()
    torch.set_default_dtype(config.dtype)
    try:
        with torch.device(device):
            model_class = DeepseekForCausalLM if config.arch.mla is not None else MoeForCausalLM
            model = model_class(config.arch, parallel)
    finally:
        torch.set_default_dtype(prev_dtype)
    if config.load_format == "dummy":
        init_dummy_weights(model, config.seed)
        if config.dummy_router_zipf:
            for i, layer in enumerate(model.model.layers):
                if isinstance(layer.mlp, (SparseMoeBlock, DeepseekMoE)):
                    skew_router_(layer.mlp.gate.weight, config.dummy_router_zipf, i, config.seed)
    else:
        load_weights(model, Path(config.model))
    return model.eval()
