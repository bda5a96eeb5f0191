"""elastic: a serving engine for Mixture-of-Experts LLMs whose expert-parallel ranks can grow and shrink."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

if TYPE_CHECKING:
    from elastic.entrypoints.llm import LLM
    from elastic.outputs import CompletionOutput, RequestOutput
    from elastic.sampling_params import SamplingParams

# Imported on first use, so `elastic --help` and the API process's start do not pay for torch up front.
_LAZY = {"LLM": "elastic.entrypoints.llm", "SamplingParams": "elastic.sampling_params",
         "RequestOutput": "elastic.outputs", "CompletionOutput": "elastic.outputs"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'elastic' has no attribute {name!r}")
