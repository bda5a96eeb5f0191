"""What the engine needs to know about a checkpoint, parsed once from its config.json per family."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # MoE
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    sparse_layers: tuple[bool, ...]  # per layer: MoE (True) or dense MLP (False)
    intermediate_size: int = 0  # dense-MLP layers
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one always-on expert behind a sigmoid gate
    # Attention variants
    qkv_bias: bool = False
    qk_norm: str = "none"  # "none" | "per_head" (Qwen3) | "full" (OLMoE, over all heads at once)
    clip_qkv: float | None = None
    # Checkpoint naming: the module holding a layer's experts and the names of its three projections.
    moe_prefix: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"rope type {rope_type!r} is not supported yet (supported: default)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(cfg: dict[str, Any], architecture: str) -> dict[str, Any]:
    num_heads = cfg["num_attention_heads"]
    return dict(
        architecture=architecture,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        eos_token_ids=_eos_ids(cfg),
    )


def _qwen_sparse_layers(cfg: dict[str, Any], num_experts: int) -> tuple[bool, ...]:
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense = set(cfg.get("mlp_only_layers") or [])
    return tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0
                 for i in range(cfg["num_hidden_layers"]))


def _qwen3_moe(cfg: dict[str, Any], arch: str) -> ModelArch:
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    return ModelArch(
        **_common(cfg, arch),
        num_experts=num_experts,
        top_k=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        intermediate_size=cfg.get("intermediate_size", 0),
        norm_topk_prob=cfg.get("norm_topk_prob", False),
        sparse_layers=_qwen_sparse_layers(cfg, num_experts),
        qkv_bias=cfg.get("attention_bias", False),
        qk_norm="per_head",
    )


def _qwen2_moe(cfg: dict[str, Any], arch: str) -> ModelArch:
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    return ModelArch(
        **_common(cfg, arch),
        num_experts=num_experts,
        top_k=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        intermediate_size=cfg.get("intermediate_size", 0),
        shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0),
        norm_topk_prob=cfg.get("norm_topk_prob", False),
        sparse_layers=_qwen_sparse_layers(cfg, num_experts),
        qkv_bias=cfg.get("qkv_bias", True),
    )


def _mixtral(cfg: dict[str, Any], arch: str) -> ModelArch:
    window = cfg.get("sliding_window")
    if window is not None and window < cfg.get("max_position_embeddings", 0):
        raise ValueError(f"sliding-window attention (sliding_window={window}) is not supported yet")
    return ModelArch(
        **_common(cfg, arch),
        num_experts=cfg["num_local_experts"],
        top_k=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["intermediate_size"],
        norm_topk_prob=True,  # Mixtral renormalises its top-k softmax weights
        sparse_layers=(True,) * cfg["num_hidden_layers"],
        moe_prefix="block_sparse_moe",
        expert_names=("w1", "w3", "w2"),
    )


def _olmoe(cfg: dict[str, Any], arch: str) -> ModelArch:
    return ModelArch(
        **_common(cfg, arch),
        num_experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["intermediate_size"],
        norm_topk_prob=cfg.get("norm_topk_prob", False),
        sparse_layers=(True,) * cfg["num_hidden_layers"],
        qkv_bias=cfg.get("attention_bias", False),
        qk_norm="full",
        clip_qkv=cfg.get("clip_qkv"),
    )


FAMILIES: dict[str, Callable[[dict[str, Any], str], ModelArch]] = {
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "Qwen2MoeForCausalLM": _qwen2_moe,
    "MixtralForCausalLM": _mixtral,
    "OlmoeForCausalLM": _olmoe,
}


def load_arch(model_dir: str | Path) -> ModelArch:
    """Parse `model_dir/config.json`; errors say what is wrong and what is supported."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model directory needs a Hugging Face config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            try:
                return FAMILIES[arch](cfg, arch)
            except KeyError as e:
                raise ValueError(f"{path}: field {e.args[0]!r} is required for {arch}") from None
    raise ValueError(f"{path}: architecture {archs or 'missing'} is not supported; "
                     f"supported: {', '.join(FAMILIES)}")
