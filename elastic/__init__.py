"""elastic: a serving engine for Mixture-of-Experts LLMs whose expert-parallel ranks can grow and shrink."""
from elastic.entrypoints.llm import LLM
from elastic.outputs import CompletionOutput, RequestOutput
from elastic.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
