"""The one step loop every benchmark drives an engine with (`nanorun bench` and bench/ alike).

A RequestSource says which requests are due and when; the loop adds each once it is due, steps
the engine while anything is unfinished, sleeps while nothing is due yet, and tells the source
when each request ends, so a closed-loop workload (a conversation's next turn, sent only after
the previous answer arrives) and an open-loop one (arrival times fixed up front) run through
the same code. Times are seconds from the loop's start on `time.perf_counter`, the engine's
clock, so a request's TTFT counts the time it waited for a busy step; or, with a StepClock,
engine steps (a device-independent clock: the scheduling study counts latency in steps).

Any engine with add_request / step / has_unfinished_requests / abort_request runs here: the
token-level `Engine` and the text-level `TextEngine`. A request the engine refuses is recorded
in `Stepped.errors` and the loop goes on; if a step itself raises, the requests in flight fail
with that reason, `Stepped.stopped` says why, and the loop ends.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams

logger = logging.getLogger("nanorun")


@dataclass(frozen=True)
class Submission:
    """One request a source sends: its id, prompt token ids, sampling and due time (seconds
    from the loop's start)."""

    request_id: str
    prompt: Sequence[int]
    params: SamplingParams
    due: float = 0.0


class RequestSource(Protocol):
    """What the loop asks a workload."""

    def due(self, now: float) -> list[Submission]:
        """The requests due by `now` not yet returned, each returned once."""

    def next_due(self) -> float | None:
        """When the next request not yet returned is due; None when no time is known yet
        (waiting on an answer) or nothing is left."""

    def finished(self, request_id: str, output: RequestOutput | None, now: float) -> None:
        """A request ended: with its output, or None when it failed (refused, step failed)."""

    def exhausted(self) -> bool:
        """Nothing more will ever be due."""


@dataclass
class Stepped:
    """What one run of the loop produced."""

    outputs: dict[str, RequestOutput] = field(default_factory=dict)  # finished, by request id
    errors: dict[str, str] = field(default_factory=dict)             # failed, by request id
    step_seconds: list[float] = field(default_factory=list)          # each step's wall time
    wall_s: float = 0.0              # from the start to the last completion
    stopped: str | None = None       # why the loop ended early (a step raised), else None

    @property
    def steps(self) -> int:
        return len(self.step_seconds)

    def token_ids(self) -> dict[str, list[int]]:
        """Each finished request's first output sequence's token ids."""
        return {rid: list(out.outputs[0].token_ids) for rid, out in self.outputs.items()}

    @property
    def preemptions(self) -> int:
        return sum(out.metrics.num_preemptions for out in self.outputs.values()
                   if out.metrics is not None)


class WallClock:
    """Seconds since the loop's start; waiting sleeps."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start

    def wait_until(self, t: float) -> None:
        wait = t - self.now()
        if wait > 0:
            time.sleep(wait)

    def tick(self) -> None:
        pass

    def arrival_time(self, due: float) -> float | None:
        """The engine's arrival time of a request due at `due`: its scheduled time, so the
        wait for a busy step counts in its latency."""
        return self.start + due


class StepClock:
    """Engine steps taken; waiting while the engine is idle skips ahead to the next due step."""

    def __init__(self) -> None:
        self.step = 0

    def now(self) -> float:
        return float(self.step)

    def wait_until(self, t: float) -> None:
        self.step = max(self.step, math.ceil(t))

    def tick(self) -> None:
        self.step += 1

    def arrival_time(self, due: float) -> float | None:
        return None     # the engine's own clock: latencies are counted in steps here


def run_requests(engine: Any, source: RequestSource, *,
                 on_end: Callable[[str], None] | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None,
                 clock: WallClock | StepClock | None = None) -> Stepped:
    """Step `engine` until `source` is exhausted and every request it sent has ended.

    on_end(request_id) is called once per request that ends, finished or failed (a progress
    bar, for instance); on_output(output) for every output of every step, finished or not.
    clock: a WallClock (the default) or a StepClock.
    """
    result, in_flight = Stepped(), set()
    clock = clock or WallClock()
    start = time.perf_counter()

    def end(rid: str, output: RequestOutput | None, error: str = "") -> None:
        if output is not None:
            result.outputs[rid] = output
        else:
            result.errors[rid] = error
        in_flight.discard(rid)
        source.finished(rid, output, clock.now())
        if on_end is not None:
            on_end(rid)

    while True:
        for sub in source.due(clock.now()):
            error = _add(engine, sub, clock.arrival_time(sub.due))
            if error:
                end(sub.request_id, None, error)
            else:
                in_flight.add(sub.request_id)
        if not engine.has_unfinished_requests():
            for rid in sorted(in_flight):   # the engine dropped it without a last output
                end(rid, None, "the engine ended the request without a finished output")
            if source.exhausted():
                break
            due = source.next_due()
            if due is None:
                raise RuntimeError(f"{type(source).__name__} has requests left but none due "
                                   f"and none in flight to wait for")
            clock.wait_until(due)
            continue
        t = time.perf_counter()
        try:
            outputs = engine.step()
        except Exception as e:  # the engine's state is unknown now: end the run, keep the rest
            result.stopped = f"engine step failed: {type(e).__name__}: {e}"
            logger.error("%s; failing %d requests in flight", result.stopped, len(in_flight))
            engine.abort_request(sorted(in_flight))
            for rid in sorted(in_flight):
                end(rid, None, result.stopped)
            break
        result.step_seconds.append(time.perf_counter() - t)
        clock.tick()
        for out in outputs:
            if on_output is not None:
                on_output(out)
            if out.finished and out.request_id in in_flight:
                end(out.request_id, out)
    result.wall_s = time.perf_counter() - start
    return result


def step_until_done(engine: Any) -> Stepped:
    """Step `engine` until every request already added to it has finished."""
    result = Stepped()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        for out in engine.step():
            if out.finished:
                result.outputs[out.request_id] = out
        result.step_seconds.append(time.perf_counter() - t)
    result.wall_s = time.perf_counter() - start
    return result


class ScheduledSource:
    """An open-loop source: the submissions are due at their own times, whatever the answers."""

    def __init__(self, submissions: Sequence[Submission]) -> None:
        self._subs = sorted(submissions, key=lambda s: s.due)
        self._next = 0

    def due(self, now: float) -> list[Submission]:
        start = self._next
        while self._next < len(self._subs) and self._subs[self._next].due <= now:
            self._next += 1
        return self._subs[start:self._next]

    def next_due(self) -> float | None:
        return self._subs[self._next].due if self._next < len(self._subs) else None

    def finished(self, request_id: str, output: RequestOutput | None, now: float) -> None:
        pass

    def exhausted(self) -> bool:
        return self._next >= len(self._subs)

    def not_sent(self) -> list[Submission]:
        """What was never due (the loop stopped early)."""
        return self._subs[self._next:]


def _add(engine: Any, sub: Submission, arrival_time: float | None) -> str:
    """Queue one request; "" on success, else why it could not be added."""
    try:
        engine.add_request(sub.request_id, list(sub.prompt), sub.params, arrival_time)
    except (ValueError, TypeError, RuntimeError) as e:
        return f"not added: {e}"
    return ""
