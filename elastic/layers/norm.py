from __future__ import annotations

import torch
from torch import nn

from elastic.kernels.norm import fused_add_rms_norm, rms_norm, sum_add_rms_norm
from elastic.layers.linear import default_weight_loader
from elastic.layers.unreduced import UnreducedRows, reduced


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor | UnreducedRows,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [T, N] (or [T, heads, N] for per-head norms) -> normed x.
        With `residual` [T, N]: -> (normed(residual + x), residual + x), the fused pre-norm style; x may then
        be an MoE layer's unreduced output, summed in the same kernel.
        Normalises in fp32 and casts back before the scale, as the reference implementations do;
        one Triton kernel on CUDA (see elastic.kernels.norm)."""
        if residual is None:
            return rms_norm(reduced(x), self.weight, self.eps)
        if isinstance(x, UnreducedRows):
            return sum_add_rms_norm(x.blocks, residual, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)
