"""An MoE layer's output still spread over per-rank partial blocks (the peer-to-peer exchange's combine buffer).

The next RMSNorm sums the blocks as it adds the residual (one kernel, `sum_add_rms_norm`): a decode step of an
expert-parallel model runs no separate reduce kernel and writes no [T, H] tensor between the two. Any other
reader calls `reduce()`. The blocks stay valid until this rank's next MoE layer dispatches (a peer writes its
results there only after this rank's next dispatch reached it, and this rank unpacks low-latency results there
only in its own next push: both come after its next norm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class UnreducedRows:
    """blocks [P, rows, H]: the output's first `num_tokens` rows are the P blocks summed in fp32 in block
    order and rounded once to blocks.dtype; `reduce` -> that sum [num_tokens, H] as a tensor."""

    blocks: torch.Tensor
    num_tokens: int
    reduce: Callable[[], torch.Tensor]


def reduced(x: torch.Tensor | UnreducedRows) -> torch.Tensor:
    return x.reduce() if isinstance(x, UnreducedRows) else x
