from __future__ import annotations

import torch
from torch import nn

from elastic.kernels.rotary import apply_rotary, qk_norm_rotary
from elastic.layers.norm import RMSNorm


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves) with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_position: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

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
