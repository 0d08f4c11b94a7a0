"""nanorun: an intra-device nano-batch execution runtime for LLM serving."""

from .engine import Engine
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams, StructuredOutputsParams
from .text_engine import TextEngine

__version__ = "0.1.0"

__all__ = ["LLM", "Engine", "TextEngine", "SamplingParams", "StructuredOutputsParams",
           "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics", "__version__"]
