"""Launch configurations for the fused MoE kernels.

A configuration is a dict:
    {"BLOCK_M": 16,
     "up":   {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
     "down": {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}}
BLOCK_M is shared because both GEMMs walk the same slot-aligned blocks; the other
parameters are per GEMM because their shapes differ (up: N=2*I, K=H; down: N=H, K=I).

Tuned tables live in kernels/configs/E={S},N={I},device_name={name},dtype={dtype}.json and map a
token-count bucket ("1", "2", "4", ...) to a configuration; the bucket nearest to the actual
token count is used. Without a table a heuristic picks a configuration.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

MoEConfig = dict[str, Any]

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


@functools.lru_cache(maxsize=None)
def device_name_for(device: torch.device) -> str:
    """Name used in config file names: 'NVIDIA_H200', or 'cpu' (interpreter runs)."""
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).replace(" ", "_")


def config_file_name(num_slots: int, inter_size: int, device_name: str, dtype: torch.dtype) -> str:
    return f"E={num_slots},N={inter_size},device_name={device_name},dtype={dtype_name(dtype)}.json"


@functools.lru_cache(maxsize=None)
def load_table(num_slots: int, inter_size: int, device_name: str,
               dtype: torch.dtype) -> Optional[dict[int, MoEConfig]]:
    path = CONFIG_DIR / config_file_name(num_slots, inter_size, device_name, dtype)
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return {int(k): v for k, v in raw.items() if not k.startswith("_")}


def _gemm(block_n: int, block_k: int, group_m: int, warps: int, stages: int) -> dict[str, int]:
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m,
            "num_warps": warps, "num_stages": stages}


def heuristic_config(num_tokens: int, top_k: int, num_slots: int) -> MoEConfig:
    """Fallback for shapes without a tuned table, distilled from the H200 tables in configs/.

    The driver is the mean number of rows an active slot receives: with few rows per slot the
    GEMMs are weight-bandwidth bound, so BLOCK_M stays at the tl.dot minimum (16) and deep K
    tiles keep many weight bytes in flight (narrower N tiles while there are few blocks, so
    that every SM gets work); with many rows they become compute bound and the usual
    128x256 Hopper tile wins (BLOCK_N of the up GEMM counts each of its two halves).
    """
    pairs = max(1, num_tokens * top_k)
    rows_per_slot = pairs / min(num_slots, pairs)
    if rows_per_slot <= 16:
        g = _gemm(64, 128, 1, 4, 3) if pairs < 64 else _gemm(128, 128, 1, 4, 3)
        return {"BLOCK_M": 16, "up": g, "down": dict(g)}
    if rows_per_slot <= 32:
        g = _gemm(128, 128, 4, 4, 3)
        return {"BLOCK_M": 32, "up": g, "down": dict(g)}
    if rows_per_slot <= 96:
        return {"BLOCK_M": 64, "up": _gemm(64, 64, 8, 4, 4), "down": _gemm(128, 64, 8, 4, 4)}
    return {"BLOCK_M": 128, "up": _gemm(128, 64, 8, 8, 4), "down": _gemm(256, 64, 8, 8, 4)}


def get_moe_config(num_tokens: int, top_k: int, num_slots: int, inter_size: int,
                   dtype: torch.dtype, device: torch.device) -> MoEConfig:
    table = load_table(num_slots, inter_size, device_name_for(device), dtype)
    if not table:
        return heuristic_config(num_tokens, top_k, num_slots)
    bucket = min(table, key=lambda b: (abs(b - num_tokens), b))
    return table[bucket]
