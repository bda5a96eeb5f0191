from __future__ import annotations

import math

import torch
from torch import nn

from elastic.config.model_arch import YarnScaling
from elastic.kernels.rotary import apply_rotary, qk_norm_rotary, qk_rotary_store
from elastic.layers.norm import RMSNorm


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, theta: float, yarn: YarnScaling) -> tuple[torch.Tensor, float]:
    """YaRN frequencies and cos/sin scale (transformers' _compute_yarn_parameters): low frequencies are
    interpolated by `factor`, high ones kept, with a linear ramp between the correction dims."""
    f = yarn.factor
    attention_factor = yarn.attention_factor
    if attention_factor is None:
        attention_factor = (yarn_mscale(f, yarn.mscale) / yarn_mscale(f, yarn.mscale_all_dim)
                            if yarn.mscale and yarn.mscale_all_dim else yarn_mscale(f))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (f * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves) with a precomputed cos/sin table; with YaRN the table holds
    the scaled frequencies and is multiplied by YaRN's attention factor."""

    def __init__(self, head_dim: int, max_position: int, theta: float, yarn: YarnScaling | None = None) -> None:
        super().__init__()
        scale = 1.0
        if yarn is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        else:
            inv_freq, scale = yarn_inv_freq(head_dim, theta, yarn)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        self.register_buffer("cos", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin", freqs.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T]; q [T, Hq, D]; k [T, Hkv, D] -> rotated (q, k), in fp32 math.
        # With q_norm/k_norm (per-head RMSNorms, weight [D]): normalise each head first, fused into
        # the same kernel on CUDA (Qwen3).
        if q_norm is None or k_norm is None:
            assert q_norm is None and k_norm is None, "pass both per-head norms or neither"
            return apply_rotary(positions, q, k, self.cos, self.sin)
        assert q_norm.eps == k_norm.eps, "the fused q/k norm uses one eps"
        return qk_norm_rotary(positions, q, k, q_norm.weight, k_norm.weight, q_norm.eps, self.cos, self.sin)

    def rotate_into_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          qk_norms: tuple[RMSNorm, RMSNorm] | None = None) -> torch.Tensor:
        """forward, with the rotated k and v [T, Hkv, D] written into the paged caches at slot_mapping (what
        store_kvcache does) -> the rotated q. One kernel on CUDA, where the two steps are two."""
        if qk_norms is None:
            return qk_rotary_store(positions, q, k, v, self.cos, self.sin, k_cache, v_cache, slot_mapping)
        q_norm, k_norm = qk_norms
        assert q_norm.eps == k_norm.eps, "the fused q/k norm uses one eps"
        return qk_rotary_store(positions, q, k, v, self.cos, self.sin, k_cache, v_cache, slot_mapping,
                               q_norm.weight, k_norm.weight, q_norm.eps)
