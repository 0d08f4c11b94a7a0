"""nanorun: an intra-device nano-batch execution runtime for LLM serving."""

from .engine import Engine
from .llm import LLM
from .outputs import RequestMetrics, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "Engine", "SamplingParams", "RequestOutput", "RequestMetrics", "__version__"]
