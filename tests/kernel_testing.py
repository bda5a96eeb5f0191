"""Helpers shared by the kernel test modules (not a test file).

kernels/ installs as `elastic.kernels`; the tests load this checkout's folder under a private module
name, so they do not depend on how (or whether) the package is installed.
"""
from __future__ import annotations

import importlib.util
import sys
import zlib
from pathlib import Path
from types import ModuleType

import pytest
import torch

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed: Triton interpreter checks skipped "
                           "(the torch reference tests still run)")


def load_kernels(name: str = "_elastic_kernels_under_test") -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, KERNELS_DIR / "__init__.py", submodule_search_locations=[str(KERNELS_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def gen(*key: object) -> torch.Generator:
    """A fresh, reproducible random stream per check."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def poisoned(*shape: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """Stands in for the launchers' allocator: NaN / 2**30 everywhere, so unwritten elements show."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(2**30)
