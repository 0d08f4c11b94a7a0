"""Execution backends: how a Plan's launches reach streams (see streams.py), the CUDA backend
(green-context partitions, events, SM budgets: cuda.py, partitions.py) and whole-iteration CUDA
graphs (graphs.py)."""

from .cuda import CudaStreams, current_sm_budget
from .graphs import IterationGraphs, graph_sizes, padded_size
from .streams import MAIN, SimulatedStreams, Streams, issue

__all__ = ["MAIN", "CudaStreams", "IterationGraphs", "SimulatedStreams", "Streams",
           "current_sm_budget", "graph_sizes", "issue", "padded_size"]
