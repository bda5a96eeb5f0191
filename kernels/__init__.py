"""Kernels of the elastic serving engine (installed as `elastic.kernels`).

Every operation has a Triton implementation (CUDA, bf16/fp16, fp32 accumulation) and a pure
torch reference that defines its semantics; the public functions pick the Triton path for CUDA
tensors when Triton is installed and the reference otherwise (e.g. the CPU engine path).
Importing this package never imports triton: the Triton modules load on first use.
"""
from ._backend import HAS_TRITON, use_triton
from .attention import paged_attention, paged_attention_reference, store_kvcache, store_kvcache_reference
from .fused_moe import fused_moe, fused_moe_pairs, fused_moe_reference
from .linear import linear
from .mla import mla_attention, mla_attention_reference, store_latent, store_latent_reference
from .moe_config import get_moe_config, heuristic_config
from .routing import topk_route, topk_route_reference

__all__ = [
    "HAS_TRITON", "use_triton", "linear",
    "fused_moe", "fused_moe_pairs", "fused_moe_reference", "get_moe_config", "heuristic_config",
    "topk_route", "topk_route_reference",
    "store_kvcache", "store_kvcache_reference", "paged_attention", "paged_attention_reference",
    "mla_attention", "mla_attention_reference", "store_latent", "store_latent_reference",
]
