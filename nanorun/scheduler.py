"""Dynamic SplitFuse batch formation over a paged KV cache.

Every iteration gets a fixed token budget (the dense batch size). It is filled, in order, with
  1. one decode token for every running request that is decoding,
  2. the next chunk of a prompt that was split in the previous iteration,
  3. chunks of waiting prompts, first come first served,
until the budget is exactly used or nothing is left. Only the chunk that reaches a request's
last known token samples. When a running request needs a page and none is free, the most
recently admitted request still unscheduled this iteration is preempted: its pages are freed and
it goes back to the front of the waiting queue to be recomputed later. Nothing is dropped.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from .kv_cache import KVCache
from .request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute the KV of tokens [start, start + length) of `request` this iteration."""

    request: Request
    start: int
    length: int

    @property
    def samples(self) -> bool:
        return self.start + self.length == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def num_decode_tokens(self) -> int:
        return sum(c.length for c in self.chunks if c.request.is_decoding)


class Scheduler:
    def __init__(self, kv_cache: KVCache, max_batch_tokens: int) -> None:
        self.kv = kv_cache
        self.max_batch_tokens = max_batch_tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []          # in admission order

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues (finished or aborted) and free its pages."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.release(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_batch_tokens)
        if not out.preempted:   # short of pages: admit nothing new this iteration
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # Decode tokens first, then the continuing prompt chunks; victims come off the back.
        queue = [r for r in self.running if r.is_decoding]
        queue += [r for r in self.running if not r.is_decoding]
        i = 0
        while i < len(queue) and budget > 0:
            request = queue[i]
            n = min(request.num_remaining, budget)
            end = request.num_computed_tokens + n
            while not self.kv.can_grow(request, end) and queue[-1] is not request:
                self._preempt(queue.pop(), out)
            if not self.kv.can_grow(request, end):
                self._preempt(queue.pop(), out)     # no one left to make room: itself
                break
            self.kv.grow(request, end)
            out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
            budget -= n
            i += 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0:
            request = self.waiting[0]
            n = min(request.num_remaining, budget)
            if not self.kv.can_grow(request, request.num_computed_tokens + n):
                break
            self.waiting.popleft()
            self.kv.grow(request, request.num_computed_tokens + n)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
            budget -= n

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.kv.release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.metrics.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)
