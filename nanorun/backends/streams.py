"""Streams and events: how a Plan becomes stream-ordered work, whatever runs it.

The executor never launches an op itself on a GPU stream. It hands the plan to `issue()`, which
turns it into three kinds of calls on a `Streams`: run this op on stream s, record an event on
s, make s wait for an event. The CUDA backend (backends/cuda.py) maps them to partition streams
and CUDA events; `SimulatedStreams` runs them on the CPU in a random interleaving constrained
ONLY by stream order and the events issue() actually recorded and waited for. So a bug in the
wiring (a missing record, a wait on the wrong stream or event) shows up as a wrong result in a
CPU test, which is the closest a machine without a GPU gets to a race on one.

Stream MAIN is the caller's stream: the one torch's current stream is (or the stream a CUDA
graph is captured on). Batch metadata arrives there and the logits are computed there.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from ..planner import LOGITS, Launch, Plan

MAIN = -1


class Streams(ABC):
    """Where launches run: one stream per layout partition (0, 1, ...) plus MAIN."""

    @abstractmethod
    def enqueue(self, stream: int, fn: Callable[[], None]) -> None:
        """Run fn's device work on `stream`, after everything enqueued there before."""

    @abstractmethod
    def record(self, stream: int) -> Any:
        """An event that completes once the work enqueued on `stream` so far has."""

    @abstractmethod
    def wait(self, stream: int, event: Any) -> None:
        """Work enqueued on `stream` from now on starts only after `event` completes."""

    @abstractmethod
    def capture(self, fn: Callable[[], None]) -> Any:
        """A graph of the work fn enqueues (none of it runs now); replay it with replay()."""

    @abstractmethod
    def replay(self, graph: Any) -> None:
        """Enqueue a captured graph's work again, after the work already on MAIN."""

    def flush(self) -> None:
        """Make sure the enqueued work runs. A GPU already has it; the simulation runs it now."""


def issue(plan: Plan, streams: Streams, run: Callable[[Launch], None]) -> None:
    """Enqueue every launch of `plan` but the logits, with exactly the waits it needs.

    fork: a stream whose first launch waits for nothing waits for MAIN (the batch, and the
          previous iteration's readers of the workspace, are there); any other stream is
          already ordered after MAIN through the launch its first launch waits for.
    body: each launch waits for the events of Launch.waits, runs, and records an event if a
          later launch waits for it.
    join: MAIN waits for the last launch of every stream nobody else waits for (the others
          are covered through their waiters), so the logits, computed next on MAIN, and
          everything after them see the whole iteration.

    Consecutive launches on one stream with no wait or record between them go in one
    enqueue: the same calls in the same order, but one stream switch (and SM budget) per run
    instead of per launch. What this needs of the plan is worked out once per plan
    (`IssueProgram`) and kept with it, so that a cached plan is issued by a plain loop.
    """
    program = plan.derived.get("issue")
    if program is None:
        program = plan.derived["issue"] = IssueProgram.of(plan)
    if program.fork:
        fork = streams.record(MAIN)
        for s in program.fork:
            streams.wait(s, fork)
    events: list[Any] = [None] * program.num_events
    for stream, waits, launches, slot in program.runs:
        for w in waits:
            streams.wait(stream, events[w])
        streams.enqueue(stream, partial(_run_all, run, launches))
        if slot >= 0:
            events[slot] = streams.record(stream)
    for s in program.join:
        streams.wait(MAIN, streams.record(s))


def _run_all(run: Callable[[Launch], None], launches: tuple[Launch, ...]) -> None:
    for launch in launches:
        run(launch)


@dataclass(frozen=True)
class IssueProgram:
    """issue()'s calls for one plan, precomputed (see issue()).

    fork: the streams that wait for MAIN first. runs: (stream, event slots to wait for, the
    launches, the slot to record into after them or -1), in issue order. join: the streams
    MAIN waits for at the end. num_events: slots the runs record into.
    """

    fork: tuple[int, ...]
    runs: tuple[tuple[int, tuple[int, ...], tuple[Launch, ...], int], ...]
    join: tuple[int, ...]
    num_events: int

    @classmethod
    def of(cls, plan: Plan) -> "IssueProgram":
        body = [(i, launch) for i, launch in enumerate(plan.launches) if launch.op != LOGITS]
        waited = {w for _, launch in body for w in launch.waits}
        slot = {w: k for k, w in enumerate(sorted(waited))}
        first: dict[int, Launch] = {}
        last: dict[int, int] = {}
        for i, launch in body:
            first.setdefault(launch.stream, launch)
            last[launch.stream] = i
        runs: list[list] = []
        for i, launch in body:
            prev = runs[-1] if runs else None
            if prev is None or prev[0] != launch.stream or prev[3] >= 0 or launch.waits:
                prev = [launch.stream, tuple(slot[w] for w in launch.waits), [], -1]
                runs.append(prev)
            prev[2].append(launch)
            if i in waited:
                prev[3] = slot[i]
        return cls(fork=tuple(s for s, launch in first.items() if not launch.waits),
                   runs=tuple((s, w, tuple(ls), k) for s, w, ls, k in runs),
                   join=tuple(s for s, i in last.items() if i not in waited),
                   num_events=len(slot))


class SimulatedStreams(Streams):
    """A CPU stand-in for a GPU's streams, events and graphs.

    Enqueued work waits in one FIFO per stream; flush() runs it. Each step runs the head of the
    highest-priority stream whose head can go (a wait goes once its event's record has run);
    priorities are random and redrawn at random steps (1 in 8), so a stream runs ahead in
    bursts as a GPU stream does while another is busy: a race that needs one stream to get
    several launches ahead is found in a few runs (probabilistic concurrency testing), where
    taking a random stream at every step would rarely get there. Graph capture records the
    calls instead of queueing them, and replay queues them again: the replayed closures read
    whatever their fixed buffers hold then, as a CUDA graph's kernels do.
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.queues: dict[int, deque] = {}
        self._capturing: list | None = None

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def enqueue(self, stream: int, fn: Callable[[], None]) -> None:
        self._put(stream, ("run", fn))

    def record(self, stream: int) -> "SimulatedEvent":
        event = SimulatedEvent()
        self._put(stream, ("record", event))
        return event

    def wait(self, stream: int, event: "SimulatedEvent") -> None:
        self._put(stream, ("wait", event))

    def capture(self, fn: Callable[[], None]) -> list:
        self._capturing = []
        try:
            fn()
            return self._capturing
        finally:
            self._capturing = None

    def replay(self, graph: list) -> None:
        # A replay records new instances of the events recorded inside the graph; a wait on an
        # event never recorded there (nor anywhere) stays a no-op.
        fresh = {id(arg): SimulatedEvent() for _, (kind, arg) in graph if kind == "record"}
        for stream, (kind, arg) in graph:
            if kind != "run":
                arg = fresh.get(id(arg), arg)
            self._put(stream, (kind, arg))

    def flush(self) -> None:
        priority: dict[int, float] = {}
        while any(self.queues.values()):
            if self.rng.random() < 1 / 8:
                priority.clear()
            ready = [s for s, q in sorted(self.queues.items()) if q and _can_go(q[0])]
            if not ready:
                raise RuntimeError("simulated streams deadlock: every head waits for an event "
                                   "that is never recorded before it")
            first = max(ready, key=lambda s: priority.setdefault(s, self.rng.random()))
            kind, arg = self.queues[first].popleft()
            if kind == "run":
                arg()
            elif kind == "record":
                arg.done = True

    def _put(self, stream: int, item: tuple) -> None:
        if self._capturing is not None:
            self._capturing.append((stream, item))
        else:
            self.queues.setdefault(stream, deque()).append(item)


class SimulatedEvent:
    """Done once its record has run. An event nothing recorded is done, as waiting on a
    never-recorded CUDA event returns at once."""

    def __init__(self, done: bool = False) -> None:
        self.done = done


def _can_go(item: tuple) -> bool:
    kind, arg = item
    return kind != "wait" or arg.done
