"""The CUDA backend's streams: partitions as streams, torch CUDA events, CUDA graphs, and every
launch told its partition's SM budget.

Budgets. A green context confines a partition's kernels to its SMs, but libraries still size
their grids for the whole device unless told otherwise, leaving the last wave mostly idle:
  - GEMMs: torch passes its (experimental) SM carveout to cuBLASLt as
    CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET = device SMs - carveout. Plain cuBLAS ignores it, so a
    launch on a partition with a budget prefers cuBLASLt. Both are set around the launch only.
  - our attention kernel: `current_sm_budget()` says, while a launch is being enqueued, how
    many SMs its partition has; the kernel wrapper sizes its CTA budget from it.
On plain streams (no green contexts) these budgets are what keeps each op near its share.
Under graph capture they are read at capture time and baked into the graph.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch

from ..layout import Layout
from .partitions import open_partitions
from .streams import MAIN, Streams

logger = logging.getLogger("nanorun")
_SM_BUDGET: ContextVar[int | None] = ContextVar("nanorun_sm_budget", default=None)


def current_sm_budget() -> int | None:
    """SMs of the partition whose launch is being enqueued now; None: the whole device."""
    return _SM_BUDGET.get()


class CudaStreams(Streams):
    """A stream per layout partition (green contexts where possible) plus torch's current
    stream as MAIN; events are torch.cuda.Events, graphs torch.cuda.CUDAGraphs sharing one
    memory pool (they hold no outputs, so replaying them in any order is safe)."""

    def __init__(self, layout: Layout, device: torch.device | str,
                 ordinary: frozenset[str] = frozenset()) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(f"the CUDA backend needs a CUDA device, but torch "
                               f"{torch.__version__} sees none; use device='cpu'")
        device = torch.device(device)
        self.device = torch.device("cuda", torch.cuda.current_device()
                                   if device.index is None else device.index)
        self.partitions, self.how = open_partitions(layout, self.device, ordinary)
        self.device_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._gemms = _GemmBudget(self.device_sms)
        self._pool = None
        logger.info("nanorun CUDA backend: %s", self.summary)

    @property
    def granted(self) -> dict[str, int]:
        """SMs each partition's stream can run on: its green context's, else the device's."""
        return {p.name: p.granted for p in self.partitions}

    @property
    def summary(self) -> str:
        """How the partitions were made and what each got, in one line."""
        parts = ", ".join(f"{p.name} {p.granted} SMs, budget {p.budget or 'none'}"
                          for p in self.partitions)
        return f"{self.how}; {parts} (device: {self.device_sms} SMs)"

    @property
    def green(self) -> bool:
        return any(p.green for p in self.partitions)

    def stream(self, stream: int) -> torch.cuda.Stream:
        if stream == MAIN:
            return torch.cuda.current_stream(self.device)
        return self.partitions[stream].stream

    def enqueue(self, stream: int, fn: Callable[[], None]) -> None:
        budget = None if stream == MAIN else self.partitions[stream].budget
        with torch.cuda.stream(self.stream(stream)), self._budget(budget):
            fn()

    def record(self, stream: int) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self.stream(stream))
        return event

    def wait(self, stream: int, event: torch.cuda.Event) -> None:
        self.stream(stream).wait_event(event)

    def capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph, pool=self._pool):
            fn()
        return graph

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.replay()

    @contextmanager
    def _budget(self, sms: int | None) -> Iterator[None]:
        token = _SM_BUDGET.set(sms)
        try:
            with self._gemms.applied(sms):
                yield
        finally:
            _SM_BUDGET.reset(token)


class _GemmBudget:
    """Sets cuBLAS(Lt)'s SM-count target around launches on partitions with a budget."""

    def __init__(self, device_sms: int) -> None:
        self.device_sms = device_sms
        self.supported = hasattr(torch._C, "_set_sm_carveout_experimental")
        self.library = torch.backends.cuda.preferred_blas_library()
        if not self.supported:
            logger.warning("nanorun CUDA backend: torch %s has no SM carveout for cuBLAS; GEMMs "
                           "size their grids for the whole device", torch.__version__)

    @contextmanager
    def applied(self, sms: int | None) -> Iterator[None]:
        if not self.supported or sms is None or sms >= self.device_sms:
            yield
            return
        torch._C._set_sm_carveout_experimental(self.device_sms - sms)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            yield
        finally:
            torch._C._set_sm_carveout_experimental(None)
            torch.backends.cuda.preferred_blas_library(self.library)
