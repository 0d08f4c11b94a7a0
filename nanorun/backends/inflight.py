"""Where an iteration's device work runs, and how its sampled ids come back to the host.

The engine hands one iteration's device work (the executor's run, then the sampler's device
ops) to a DeviceQueue and gets an InFlight back; InFlight.result() is the host's one sync
with that iteration. Under async scheduling (see Engine) the engine forms and submits the
next iteration before it calls result() on this one, so what the queue must give is work that
runs while the host goes on:

  - InlineQueue runs the work on the caller's thread. On a GPU that only enqueues kernels on
    the streams, so it returns at once; the ids are then copied into pinned host memory with
    a non-blocking copy and an event recorded after it, and result() waits for that event:
    the one sync, after the next iteration is already queued behind this one. On the CPU
    (synchronous mode) the work is simply done when submit() returns.
  - WorkerQueue (the CPU under async scheduling) runs the work on one worker thread, in
    submission order, so that iteration i + 1 is scheduled and built on the main thread while
    iteration i computes. This overlaps only where the device work releases the GIL: torch's
    CPU kernels do while they compute, Python (the executor's issue loop, the ops' dispatch)
    does not. docs/architecture.md has the measurement.
"""

from __future__ import annotations

import concurrent.futures
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class DeviceOutput:
    """One iteration's results as the device work leaves them: tokens [N] int64 and ok [N]
    bool (on the device), the sampled rows' logits [N, V] when a request wants logprobs, and
    every flagged row's logits for prompt logprobs (else None)."""

    tokens: torch.Tensor
    ok: torch.Tensor
    logits: torch.Tensor | None = None
    all_logits: torch.Tensor | None = None
    host_tokens: torch.Tensor | None = None     # filled in by result(): [N] on the host
    host_ok: torch.Tensor | None = None


class InFlight(ABC):
    """An iteration submitted to a DeviceQueue."""

    @abstractmethod
    def result(self) -> DeviceOutput:
        """Wait for the iteration; its output with host_tokens and host_ok filled in.
        Returns the same object when called again."""


class DeviceQueue(ABC):
    @abstractmethod
    def submit(self, work: Callable[[], DeviceOutput]) -> InFlight:
        """Run `work` after everything submitted before (see the module docstring)."""

    def close(self) -> None:
        """Stop taking work (the work submitted so far still completes)."""


class InlineQueue(DeviceQueue):
    def submit(self, work: Callable[[], DeviceOutput]) -> InFlight:
        out = work()
        if out.tokens.device.type != "cuda":
            return _Done(out, out.tokens, out.ok)
        both = torch.stack([out.tokens, out.ok.long()])
        host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
        host.copy_(both, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Copying(out, host, event)


class WorkerQueue(DeviceQueue):
    def __init__(self, initializer: Callable[[], None] | None = None) -> None:
        """initializer runs once on the worker thread before any work (its thread-local
        settings: numba's thread count, see backends/cpu.py)."""
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="nanorun-device", initializer=initializer)

    def submit(self, work: Callable[[], DeviceOutput]) -> InFlight:
        return _Future(self._pool.submit(_inference_mode, work))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def device_queue(device: torch.device, async_scheduling: bool,
                 cpu_threads: int | None = None) -> DeviceQueue:
    """The queue an engine on `device` runs its iterations through; cpu_threads: the
    engine's CPU thread count, which the async worker thread applies to itself."""
    if async_scheduling and device.type == "cpu":
        from .cpu import set_numba_threads

        return WorkerQueue(None if cpu_threads is None else
                           functools.partial(set_numba_threads, cpu_threads))
    return InlineQueue()


def _inference_mode(work: Callable[[], DeviceOutput]) -> DeviceOutput:
    with torch.inference_mode():    # thread-local: the worker must enter it itself
        return work()


class _Done(InFlight):
    def __init__(self, out: DeviceOutput, tokens: torch.Tensor, ok: torch.Tensor) -> None:
        out.host_tokens, out.host_ok = tokens, ok
        self._out = out

    def result(self) -> DeviceOutput:
        return self._out


class _Copying(InFlight):
    def __init__(self, out: DeviceOutput, host: torch.Tensor, event) -> None:
        self._out, self._host, self._event = out, host, event

    def result(self) -> DeviceOutput:
        if self._out.host_tokens is None:
            self._event.synchronize()
            self._out.host_tokens, self._out.host_ok = self._host[0], self._host[1].bool()
        return self._out


class _Future(InFlight):
    def __init__(self, future: concurrent.futures.Future) -> None:
        self._future = future

    def result(self) -> DeviceOutput:
        out = self._future.result()
        if out.host_tokens is None:
            out.host_tokens, out.host_ok = out.tokens, out.ok
        return out
