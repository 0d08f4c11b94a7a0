"""An asynchronous front for a TextEngine: one thread steps it, asyncio handlers await outputs.

The TextEngine is not thread-safe, so only the engine thread ever touches it. Handlers send it
commands (add, abort) through a queue; the thread runs them between steps, so an add waits at
most one step and its ValueError/TypeError comes back to the handler (an HTTP 400) with nothing
queued. After each step the thread hands every output to the event loop in one
call_soon_threadsafe, which puts it on its request's asyncio.Queue. While the thread steps, the
model's torch kernels release the GIL, so the event loop keeps serving HTTP meanwhile.

A RequestStream that is closed before its request finishes (the client went away, the handler
was cancelled) aborts the request, so its KV pages are freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("nanorun.server")


class QueueFullError(RuntimeError):
    """More requests are waiting than --max-queued-requests allows (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """A step raised: the engine's state is unknown, so it serves no more requests."""


@dataclass
class EngineStats:
    """What the engine thread publishes after each iteration (read by /metrics and admission)."""

    num_running: int = 0
    num_waiting: int = 0
    num_pages: int = 0
    num_free_pages: int = 0


class RequestStream:
    """The outputs of one request, in order; iterate with `async for`. The last is finished."""

    def __init__(self, engine: AsyncEngine, request_id: str, num_seqs: int = 1) -> None:
        self.request_id = request_id
        self.num_seqs = num_seqs
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self):
        """The newest output. Outputs are cumulative (all text and tokens so far), so when a
        consumer falls behind the steps, the ones it missed merge into the latest (as vLLM's
        output collector does): a slow client gets fewer, larger chunks, never a backlog."""
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not item.finished:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def abort(self) -> None:
        """Stop the request unless it already ended (idempotent)."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    """Serve a TextEngine to asyncio handlers. start() inside the running event loop.

    max_queued_requests bounds the requests that wait for their first step (added but not
    running): past it, add_request raises QueueFullError instead of queueing, so an overloaded
    server answers 503 at once. on_outputs(outputs, now) runs in the engine thread after each
    step (metrics); it must be quick.
    """

    def __init__(self, text_engine, *, max_queued_requests: int,
                 on_outputs: Callable[[Sequence[Any]], None] | None = None) -> None:
        if max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        self.text_engine = text_engine
        self.max_queued_requests = max_queued_requests
        self.stats = EngineStats()
        self.error: BaseException | None = None
        self._on_outputs = on_outputs
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, RequestStream] = {}     # touched on the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nanorun-engine", daemon=True)
        self._publish()

    # -- event-loop side ----------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def num_unfinished(self) -> int:
        """Requests added here and not yet ended (read on the event loop)."""
        return len(self._streams)

    async def add_request(self, request_id: str, prompt: Any, params: Any) -> RequestStream:
        """Queue a request; raises what TextEngine.add_request raises (ValueError, TypeError),
        QueueFullError past the bound, EngineDeadError once a step has failed."""
        if self.error is not None:
            raise EngineDeadError(f"the engine failed and serves no more requests: {self.error}")
        # In sequences, as the scheduler counts running: a request of n samples is n of them.
        n = getattr(params, "n", 1)
        if 0 < self.max_queued_requests < n:      # never servable: a 400, not 'retry later'
            raise ValueError(f"n={n} is more sequences than the server queues "
                             f"(--max-queued-requests {self.max_queued_requests})")
        waiting = sum(s.num_seqs for s in self._streams.values()) - self.stats.num_running
        if waiting + n > self.max_queued_requests:
            raise QueueFullError(f"the server is at its bound of {self.max_queued_requests} "
                                 f"waiting requests (--max-queued-requests); retry later")
        stream = RequestStream(self, request_id, n)
        self._streams[request_id] = stream      # before the thread can send it anything
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("add", (request_id, prompt, params, time.perf_counter()), done))
        try:
            await asyncio.wrap_future(done)
        except BaseException:
            self._streams.pop(request_id, None)
            # Cancelled before the thread took it: never added. Taken: it may still land.
            if not done.cancelled() and (not done.done() or done.exception() is None):
                self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._send(("abort", request_id, None))

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _deliver(self, outputs: Sequence[Any]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:           # aborted by its handler: nobody is listening
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _fail_all(self, error: BaseException) -> None:
        # The thread is gone: refuse the adds it left queued (add_request refuses new ones).
        while True:
            try:
                kind, _, done = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add" and done.set_running_or_notify_cancel():
                done.set_exception(error)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.text_engine
        while not self._stopping:
            self._wakeup.clear()
            self._run_commands()
            if not engine.has_unfinished_requests():
                self._publish()
                self._wakeup.wait()
                continue
            try:
                outputs = engine.step()
            except Exception as e:       # state unknown now: fail everyone, refuse new work
                logger.exception("engine step failed")
                self.error = EngineDeadError(f"engine step failed: {type(e).__name__}: {e}")
                self._call_loop(self._fail_all, self.error)
                return
            try:                          # metrics: a bug there must not stop the serving
                self._publish()
                if outputs and self._on_outputs is not None:
                    self._on_outputs(outputs)
            except Exception:
                logger.exception("recording metrics failed; serving on")
            if outputs:
                self._call_loop(self._deliver, outputs)

    def _run_commands(self) -> None:
        while True:
            try:
                kind, payload, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                self.text_engine.abort_request(payload)
                continue
            if not done.set_running_or_notify_cancel():    # its handler was cancelled
                continue
            request_id, prompt, params, arrival = payload
            try:
                self.text_engine.add_request(request_id, prompt, params, arrival_time=arrival)
            except Exception as e:        # ValueError/TypeError: a bad request; nothing queued
                done.set_exception(e)
            else:
                done.set_result(None)

    def _publish(self) -> None:
        engine = self.text_engine.engine
        scheduler, kv = engine.scheduler, engine.kv_cache
        self.stats = EngineStats(len(scheduler.running), len(scheduler.waiting),
                                 kv.num_pages, kv.num_free_pages)

    def _call_loop(self, fn: Callable, arg: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, arg)
            except RuntimeError:         # the loop closed while we stepped: shutting down
                pass
