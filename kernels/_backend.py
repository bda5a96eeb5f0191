"""Backend selection shared by the kernel modules.

Importing this package must stay cheap and must work on machines without Triton or CUDA
(the CPU engine path only uses the torch references), so Triton is never imported here:
`HAS_TRITON` only says whether the package is installed, and the Triton kernel modules are
imported lazily by the dispatching functions the first time a Triton path is taken.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

HAS_TRITON: bool = importlib.util.find_spec("triton") is not None
# "0" launches every kernel the plain way (no programmatic dependent launch): for A/B timings and as a way out.
# Read once: a launch must not pay for it, and captured CUDA graphs keep what their capture saw anyway.
PDL_ENV = "ELASTIC_PDL"
_PDL_OFF = os.environ.get(PDL_ENV, "1") == "0"


def interpret_mode() -> bool:
    """True when CPU tensors should take the Triton path, through Triton's interpreter (tests only).

    Two switches: TRITON_INTERPRET=1 must be set before triton is first imported (triton.language
    builds its helpers for the mode it starts in; a test session sets it up front), while
    ELASTIC_TRITON_ON_CPU=1 is flipped per test, so the engine's CPU tests keep the torch references."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and os.environ.get("ELASTIC_TRITON_ON_CPU", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    if not HAS_TRITON:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install must degrade to the references, not crash serving
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels should run for tensors living where `t` lives."""
    return (t.is_cuda or interpret_mode()) and _triton_importable()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tl_dtype(dtype: torch.dtype):  # noqa: ANN201  (a triton.language dtype; triton is imported here, lazily)
    """Triton's spelling of a float dtype, for a kernel's constexpr argument (only on a Triton path)."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl(t: torch.Tensor) -> dict[str, bool]:
    """Launch options for a Triton kernel over `t`: on a Hopper-or-later GPU, programmatic dependent launch
    (its kernel starts with pdl_triton.pdl_enter(USE_PDL), which makes it safe); {} elsewhere (the
    interpreter, older GPUs, ELASTIC_PDL=0)."""
    if not t.is_cuda or _PDL_OFF:
        return {}
    if not _pdl_capable(t.device.index if t.device.index is not None else torch.cuda.current_device()):
        return {}
    return {"USE_PDL": True, "launch_pdl": True}
