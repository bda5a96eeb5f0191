"""Skewed routing for EPLB tests and benchmarks: random routers send tokens almost uniformly to the
experts, real ones do not. Scaling router row e by zipf(rank of e) widens the spread of expert e's logits,
so it wins the top-k more often: hot experts get more tokens, cold ones fewer, in a per-layer order."""
from __future__ import annotations

import torch


def zipf_router_scales(num_experts: int, exponent: float, layer: int, seed: int = 0) -> torch.Tensor:
    """[E] row scales: the expert of rank r (0 = hottest, a per-layer permutation) gets (r + 1) ** -exponent,
    normalised so the mean scale is 1 (the router's overall sharpness stays the same)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    rank = torch.argsort(torch.randperm(num_experts, generator=gen))  # expert -> its rank in this layer
    scales = (rank.double() + 1.0) ** -exponent
    return (scales / scales.mean()).float()


@torch.no_grad()
def skew_router_(gate_weight: torch.Tensor, exponent: float, layer: int, seed: int = 0) -> None:
    """Scale the rows of one router weight [E, H] in place."""
    scales = zipf_router_scales(gate_weight.shape[0], exponent, layer, seed)
    gate_weight.mul_(scales.to(gate_weight.device, gate_weight.dtype)[:, None])
