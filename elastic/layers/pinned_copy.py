"""Host-to-device copies that never make the host wait."""
from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without a host sync: on CUDA from pinned memory, asynchronously (a copy from
    pageable memory syncs the stream, and a pipelined step must not wait for the one before it)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
