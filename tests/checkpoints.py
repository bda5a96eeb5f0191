"""Tiny random Hugging Face checkpoints for tests (a helper module, not a test file).

Every checkpoint is written by transformers' own model classes and
``save_pretrained``, so our loader is tested against the real on-disk format
(per-expert tensors, ``rope_parameters``, family-specific key names, ...).

Weights are re-initialised with larger-than-default values so that fp32 greedy
decoding is robust: the reference (transformers, helpers below) and our engine
sum in different orders, and with HF's default std 0.02 logits are so flat that
rounding noise can flip the argmax.

Typical use::

    path = make_checkpoint("qwen3_moe", tmp_path / "ckpt")
    expected = hf_greedy(path, prompts, max_new_tokens=32)
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from elastic.demo import EOS_TOKEN, PAD_TOKEN, build_tokenizer, init_random_weights

__all__ = ["family_names", "hf_greedy", "hf_logits", "make_checkpoint"]

# Small enough that several shards are written even for these tiny models
# (one fp32 expert projection is 8 KiB, the embedding ~768 KiB).
_SHARD_SIZE = "256KB"


def family_names() -> list[str]:
    """The model families of the shared equivalence tests (``make_checkpoint`` also builds DEEPSEEK_FAMILIES,
    tested on their own in test_deepseek.py)."""
    return ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


DEEPSEEK_FAMILIES = ["deepseek_v2", "deepseek_v3"]


# ----------------------------------------------------------------------------
# Tokenizer (built once per process)
# ----------------------------------------------------------------------------


@functools.cache
def _tokenizer_files() -> tuple[tuple[str, bytes], ...]:
    # Cached as file contents rather than a directory so no temp dir has to
    # outlive this call.
    with tempfile.TemporaryDirectory(prefix="elastic-test-tokenizer-") as tmp:
        build_tokenizer(tmp)
        return tuple(sorted((p.name, p.read_bytes()) for p in Path(tmp).iterdir() if p.is_file()))


@functools.cache
def _tokenizer_ids() -> tuple[int, int, int]:
    """(vocab size incl. special tokens, eos id, pad id)."""
    from tokenizers import Tokenizer

    data = dict(_tokenizer_files())["tokenizer.json"].decode("utf-8")
    tok = Tokenizer.from_str(data)
    eos, pad = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
    assert eos is not None and pad is not None
    return tok.get_vocab_size(with_added_tokens=True), eos, pad


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------


def _family_spec(family: str) -> tuple[str, str, dict[str, Any]]:
    """(config class, model class, family-specific config kwargs)."""
    if family == "qwen3_moe":
        return "Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,  # != hidden_size / num_attention_heads (= 16)
            num_experts=8,
            num_experts_per_tok=4,
            moe_intermediate_size=32,
            intermediate_size=96,  # dense MLP of the mlp_only layer
            mlp_only_layers=[1],
            decoder_sparse_step=1,
            norm_topk_prob=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    if family == "qwen2_moe":
        return "Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,  # MHA, as in Qwen1.5-MoE
            num_experts=8,
            num_experts_per_tok=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            intermediate_size=96,  # unused: every layer is sparse
            qkv_bias=True,
            norm_topk_prob=False,
            use_sliding_window=False,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    if family == "mixtral":
        return "MixtralConfig", "MixtralForCausalLM", dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=48,  # Mixtral experts use intermediate_size
            sliding_window=None,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    if family == "olmoe":
        return "OlmoeConfig", "OlmoeForCausalLM", dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            intermediate_size=32,  # OLMoE experts use intermediate_size
            clip_qkv=2.0,  # clamps ~5% of q/k/v values with this init
            norm_topk_prob=False,
            attention_bias=False,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        )
    if family == "deepseek_v2":
        # No q-LoRA, odd latent/head dims, group-limited greedy routing, a dense first layer, one shared
        # expert, YaRN whose mscale != mscale_all_dim (so cos/sin and the softmax scale are both rescaled).
        return "DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            q_lora_rank=None,
            kv_lora_rank=24,
            qk_nope_head_dim=12,
            qk_rope_head_dim=8,
            v_head_dim=20,
            n_routed_experts=8,
            num_experts_per_tok=3,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            intermediate_size=96,
            first_k_dense_replace=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.5,
            rms_norm_eps=1e-6,
            max_position_embeddings=128,  # = factor x original: no transformers warning
            rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                             "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 0.707, "mscale_all_dim": 1.0},
        )
    if family == "deepseek_v3":
        # q-LoRA, sigmoid scores with a correction bias, groups ranked by their top-2 sum, renormalised
        # and scaled weights, two shared experts, interleaved rope pairs.
        return "DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,  # the config's default (128) would break transformers' eager attention
            q_lora_rank=40,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=24,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            n_shared_experts=2,
            moe_intermediate_size=16,
            intermediate_size=96,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        )
    raise ValueError(f"unknown family {family!r}; expected one of {family_names() + DEEPSEEK_FAMILIES}")


def _config_kwargs(family: str, overrides: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    config_cls, model_cls, specific = _family_spec(family)  # validates `family` first
    vocab_size, eos_id, pad_id = _tokenizer_ids()
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        hidden_act="silu",
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        # Families default to their real tokenizers' ids (Mixtral 1/2, OLMoE
        # 50279/1); these must match our tokenizer instead.
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    kwargs.update(specific)
    kwargs.update(overrides)
    return config_cls, model_cls, kwargs


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic, well-conditioned random weights.

    * Linear / expert weights: N(0, 1/fan_in) keeps activations O(1).
    * lm_head: gain 3 -> logits with std ~3, so top-1 vs top-2 gaps are
      typically ~0.5 and almost never below 1e-3.
    * Router: gain 2 -> expert logits with std ~2: the k-th and (k+1)-th
      expert are rarely within 1e-3 (so the top-k choice does not flip on
      rounding noise), yet the top-k probability mass stays ~0.8-0.95, so
      norm_topk_prob and every selected expert's weight still matter.
    * Embeddings N(0, 1): token identity stays visible through the residual
      stream, which keeps greedy decoding from collapsing onto one token.
    * Norm weights ~ N(1, 0.2) (far enough from 1 that a dropped norm weight
      shows up in the logits); biases ~ N(0, 0.1).
    """
    init_random_weights(model, seed, norm_std=0.2, router_gain=2.0, lm_head_gain=3.0)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, buf in sorted(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: a bias large enough to change choices
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.3)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def make_checkpoint(
    family: str,
    path: str | Path,
    *,
    seed: int = 0,
    shard: bool = False,
    router_zipf: float = 0.0,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random ``family`` checkpoint (fp32 safetensors) to ``path``.

    Files: config.json, generation_config.json, model.safetensors (or several
    ``model-<i>-of-<n>.safetensors`` + ``model.safetensors.index.json``
    with ``shard=True``), tokenizer.json, tokenizer_config.json.
    ``config_overrides`` are passed to the family's config class last, e.g.
    ``make_checkpoint("qwen3_moe", p, num_hidden_layers=2, mlp_only_layers=[])``.
    ``router_zipf > 0`` skews each layer's routing by that Zipf exponent (in the saved weights, so
    transformers sees the same model): EPLB tests need hot and cold experts.
    The same (family, seed, overrides) always gives bit-identical weights.
    """
    import transformers

    config_cls, model_cls, kwargs = _config_kwargs(family, config_overrides)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    _init_weights(model, seed)
    if router_zipf:
        _skew_routers(model, router_zipf, seed)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=None,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    save_kwargs: dict[str, Any] = {"max_shard_size": _SHARD_SIZE} if shard else {}
    model.save_pretrained(str(out), **save_kwargs)
    for name, data in _tokenizer_files():
        (out / name).write_bytes(data)
    return out


def _skew_routers(model: torch.nn.Module, exponent: float, seed: int) -> None:
    from elastic.models.router_skew import skew_router_

    num_experts = model.config.num_local_experts if hasattr(model.config, "num_local_experts") else \
        model.config.num_experts
    for name, param in model.named_parameters():
        # model.layers.<i>.mlp.gate.weight (block_sparse_moe.gate for Mixtral): [E, H]
        if name.endswith(".gate.weight") and param.shape[0] == num_experts:
            skew_router_(param.data, exponent, int(name.split(".layers.")[1].split(".")[0]), seed)


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    # These models are tiny: intra-op threads only add overhead, and on a busy
    # 2-core CI box OpenMP spin-waiting made the reference 5x slower. Thread
    # count is process-wide, so it is restored on exit.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load_reference(path: str | Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # Plain eager attention/experts: the most literal implementation, which is
    # what a reference should be.
    return AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
    ).eval()


def hf_greedy(path: str | Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy ``generate`` (fp32, CPU), one prompt at a time.

    EOS never stops generation, so each result has exactly ``max_new_tokens``
    tokens. Only the new tokens are returned.
    """
    from transformers import GenerationConfig

    model = _load_reference(path)
    # generate() back-fills every None field of a passed GenerationConfig from
    # model.generation_config (i.e. generation_config.json), so eos_token_id=None
    # cannot be requested per call: replace this instance's defaults instead.
    model.generation_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=None,  # a min length works by masking EOS logits, altering the argmax
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=model.config.pad_token_id,
    )
    results: list[list[int]] = []
    with torch.inference_mode(), _single_threaded():
        for prompt in prompts:
            if not prompt:
                raise ValueError("empty prompt")
            input_ids = torch.tensor([prompt], dtype=torch.long)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
            )
            new = out[0, len(prompt) :].tolist()
            if len(new) != max_new_tokens:
                raise RuntimeError(f"generate returned {len(new)} tokens, expected {max_new_tokens}")
            results.append(new)
    return results


def hf_logits(path: str | Path, token_ids: list[int]) -> torch.Tensor:
    """transformers' forward logits for one sequence: float32 ``[seq, vocab]``."""
    model = _load_reference(path)
    with torch.inference_mode(), _single_threaded():
        logits = model(input_ids=torch.tensor([token_ids], dtype=torch.long)).logits
    return logits[0].float()
