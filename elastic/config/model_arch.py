"""What the engine needs to know about a checkpoint, parsed once from its config.json per family."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rope scaling (DeepSeek-V2/V3): frequencies blended between interpolation and extrapolation,
    cos/sin scaled by `attention_factor`, and (through `mscale_all_dim`) the softmax scale by mscale**2."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class MlaDims:
    """Multi-head latent attention (DeepSeek-V2/V3): queries through an optional low-rank q_a/q_b pair,
    keys and values through one shared latent c_kv (kv_lora_rank) plus one shared rope key."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True  # rope dims stored as (x0, x1), (x2, x3)... pairs in the checkpoint

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


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
    # DeepSeek-V2/V3: latent attention, YaRN, and routing by (grouped) top-k with a scaling factor.
    mla: MlaDims | None = None
    rope_scaling: YarnScaling | None = None
    scoring_func: str = "softmax"  # "softmax" | "sigmoid" (V3: with e_score_correction_bias for the choice)
    num_expert_groups: int = 1  # experts split in groups; only the best `topk_groups` groups are eligible
    topk_groups: int = 1
    group_score: str = "max"  # how a group is ranked: "max" (V2) | "top2_sum" (V3)
    routed_scaling_factor: float = 1.0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def _rope_type(cfg: dict[str, Any]) -> str:
    params = _rope_params(cfg)
    return params.get("rope_type", params.get("type")) or "default"


def _rope_theta(cfg: dict[str, Any], supported: tuple[str, ...] = ("default",)) -> float:
    if _rope_type(cfg) not in supported:
        raise ValueError(f"rope type {_rope_type(cfg)!r} is not supported for this family "
                         f"(supported: {', '.join(supported)})")
    return float(_rope_params(cfg).get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(cfg: dict[str, Any], architecture: str, rope_types: tuple[str, ...] = ("default",)) -> dict[str, Any]:
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
        rope_theta=_rope_theta(cfg, rope_types),
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


def _yarn(cfg: dict[str, Any]) -> YarnScaling | None:
    if _rope_type(cfg) != "yarn":
        return None
    p = _rope_params(cfg)
    original = p.get("original_max_position_embeddings")
    factor = p.get("factor")
    if original is None:
        raise ValueError("yarn rope scaling needs original_max_position_embeddings")
    if factor is None:
        factor = cfg.get("max_position_embeddings", original) / original
    return YarnScaling(float(factor), int(original), float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1),
                       float(p.get("mscale") or 0), float(p.get("mscale_all_dim") or 0), p.get("attention_factor"),
                       bool(p.get("truncate", True)))


def _deepseek(cfg: dict[str, Any], arch: str) -> ModelArch:
    """DeepSeek-V2 (softmax scores, greedy or group-limited greedy) and V3 (sigmoid scores with a correction
    bias for the choice, groups ranked by their top-2 sum). Dense MLPs before `first_k_dense_replace`."""
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ValueError(f"quantized checkpoints ({method}) are not supported; use a bf16 conversion")
    v3 = arch == "DeepseekV3ForCausalLM"
    num_experts = cfg["n_routed_experts"]
    topk_method = cfg.get("topk_method") or "greedy"
    if not v3 and topk_method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"topk_method {topk_method!r} is not supported for V2 (greedy, group_limited_greedy)")
    grouped = v3 or topk_method == "group_limited_greedy"  # transformers' V3 router always groups
    groups, topk_groups = (cfg.get("n_group") or 1, cfg.get("topk_group") or 1) if grouped else (1, 1)
    if num_experts % groups or not 1 <= topk_groups <= groups:
        raise ValueError(f"n_group={groups} must divide n_routed_experts={num_experts} and topk_group="
                         f"{topk_groups} lie in [1, n_group]")
    first_dense, freq = cfg.get("first_k_dense_replace", 0), cfg.get("moe_layer_freq", 1) or 1
    mla = MlaDims(cfg.get("q_lora_rank"), cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                  cfg["v_head_dim"], bool(cfg.get("rope_interleave", True)) if v3 else True)  # V2 always pairs
    common = _common(cfg, arch, ("default", "yarn"))
    common.update(num_kv_heads=common["num_heads"], head_dim=mla.qk_head_dim)  # per head, as if expanded
    return ModelArch(
        **common,
        num_experts=num_experts,
        top_k=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        intermediate_size=cfg.get("intermediate_size", 0),
        shared_expert_intermediate_size=cfg["moe_intermediate_size"] * (cfg.get("n_shared_experts") or 0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        sparse_layers=tuple(i >= first_dense and i % freq == 0 for i in range(cfg["num_hidden_layers"])),
        qkv_bias=cfg.get("attention_bias", False),
        mla=mla,
        rope_scaling=_yarn(cfg),
        scoring_func="sigmoid" if v3 else "softmax",
        num_expert_groups=groups,
        topk_groups=topk_groups,
        group_score="top2_sum" if v3 else "max",
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
    )


FAMILIES: dict[str, Callable[[dict[str, Any], str], ModelArch]] = {
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "Qwen2MoeForCausalLM": _qwen2_moe,
    "MixtralForCausalLM": _mixtral,
    "OlmoeForCausalLM": _olmoe,
    "DeepseekV2ForCausalLM": _deepseek,
    "DeepseekV3ForCausalLM": _deepseek,
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
