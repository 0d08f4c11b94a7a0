"""`nanorun bench`: throughput and latency on request traces, per layout, in vLLM's report format.

traces (which requests) -> workload (their prompts: a shared system prompt, multi-turn
conversations) -> arrivals (when) -> runner (the engine, layout by layout, driven by loop, the
one step loop every benchmark uses) -> report (vLLM's metrics), with the device's measured
ceilings (ceilings) and provenance (environment, whose write_result every result goes through).
"""

from .traces import NANOFLOW_FILTER, TRACES, LengthFilter, Trace, load_trace

__all__ = ["NANOFLOW_FILTER", "TRACES", "LengthFilter", "Trace", "load_trace"]
