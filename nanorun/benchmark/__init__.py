"""`nanorun bench`: throughput and latency on request traces, per layout, in vLLM's report format.

traces (which requests) -> arrivals (when) -> runner (the engine, layout by layout) -> report
(vLLM's metrics), with the device's measured ceilings (ceilings) and provenance (environment).
"""

from .traces import NANOFLOW_FILTER, TRACES, LengthFilter, Trace, load_trace

__all__ = ["NANOFLOW_FILTER", "TRACES", "LengthFilter", "Trace", "load_trace"]
