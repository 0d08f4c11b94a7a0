"""An asynchronous front for a TextEngine: an engine loop steps it, asyncio handlers await outputs.

The engine loop (engine_core.EngineLoop) runs in a process of its own for `nanorun serve`
(AsyncEngine.spawn: no GIL shared with the HTTP side; engine_core says why; the pipe to it is
an EngineLink, which engine_link says more of), or in a thread of this process over a
TextEngine built here (AsyncEngine(text_engine): embedding, tests). Either way only the loop
touches the TextEngine. Handlers send it commands (add, abort); the loop runs
them between steps, so an add waits at most one step, and its ValueError/TypeError comes back
to the handler (an HTTP 400) with nothing queued. After each step the loop sends one message
with every output, which the event loop hands to each request's RequestStream: one wake-up
of the event loop per step, not one per request.

A RequestStream that is closed before its request finishes (the client went away, the handler
was cancelled) aborts the request, so its KV pages are freed at the engine's next step.

The engine is dead once a step has raised or its process has exited (never because its pipe
was full): every waiting handler gets EngineDeadError, new requests are refused (HTTP 503),
and on_dead(error) runs once, on the event loop (`nanorun serve` then exits, so that a
supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .engine_core import (EngineLoop, EngineStats, OutputDecoder, engine_process_main,
                          engine_stats, wait_ready)
from .engine_link import EngineLink

logger = logging.getLogger("nanorun.server")

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStats", "QueueFullError", "RequestStream"]


class QueueFullError(RuntimeError):
    """More requests are waiting than --max-queued-requests allows (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """A step raised (or the engine process died): the engine serves no more requests."""


class RequestStream:
    """The outputs of one request, in order; iterate with `async for`. The last is finished.

    Outputs are cumulative (all text and tokens so far), so the stream keeps only the newest
    one: a consumer that falls behind the steps gets the latest, which holds everything the
    ones it missed did (as vLLM's output collector merges them), so a slow client gets fewer,
    larger chunks, never a backlog. An exception put in ends the stream with it.

    interval: wake the consumer once some sequence has `interval` tokens it has not seen, or
    has finished (SGLang's --stream-interval; 1: every step's tokens at once). The first
    tokens always go at once, so the time to first token is not delayed. None: only the
    final output (a request that is not streamed has nothing to do before its end).
    """

    def __init__(self, engine: AsyncEngine, request_id: str, num_seqs: int = 1,
                 interval: int | None = 1) -> None:
        self.request_id = request_id
        self.num_seqs = num_seqs
        self.interval = interval
        self._engine = engine
        self._latest: Any = None          # the newest output (or exception) not yet taken
        self._waiter: asyncio.Future | None = None
        self._seen: list[int] | None = None   # per sequence: tokens last taken (-1: finished)
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self):
        """The newest output due since the last one taken (waits for one)."""
        if self.finished:
            raise StopAsyncIteration
        while self._latest is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take()

    def _take(self):
        item, self._latest = self._latest, None
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        if not self.finished:    # what the consumer has now (outputs may change in place)
            self._seen = _token_counts(item)
        return item

    def put(self, item: Any) -> None:
        """The request's newest output, or the exception that ended it (kept over any later
        output: nothing follows an error). An output not yet due is dropped: the next one
        holds everything it did."""
        if isinstance(self._latest, BaseException):
            return
        if self._latest is not None or isinstance(item, BaseException) or self._due(item):
            self._latest = item                  # newer than one due and not yet taken
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def _due(self, out: Any) -> bool:
        """Whether the consumer should have `out`: it ends the request, or some sequence has
        `interval` tokens the consumer has not taken, or has finished since."""
        if out.finished:
            return True
        if self.interval is None:
            return False
        counts = _token_counts(out)
        if self._seen is None:                 # nothing taken yet: the first tokens go now
            return any(counts)
        return any(n < 0 <= s or n - s >= self.interval for n, s in zip(counts, self._seen))

    def abort(self) -> None:
        """Stop the request unless it already ended (idempotent)."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


def _token_counts(out: Any) -> list[int]:
    """Per sequence: its tokens so far, or -1 once it has finished."""
    return [len(c.token_ids) if c.finish_reason is None else -1 for c in out.outputs]


class AsyncEngine:
    """Serve a TextEngine to asyncio handlers. start() inside the running event loop.

    AsyncEngine(text_engine) steps it in a thread here; AsyncEngine.spawn(model, kwargs)
    builds it in an engine process (what `nanorun serve` runs). max_queued_requests bounds
    the requests that wait for their first step (added but not running): past it,
    add_request raises QueueFullError instead of queueing, so an overloaded server answers
    503 at once. on_outputs(outputs) runs on the event loop after each step (metrics), and
    on_stats(stats) with the stats of each message that counts iterations; both must be
    quick. on_dead(error) runs on the event loop once the engine has died.
    """

    def __init__(self, text_engine=None, *, max_queued_requests: int,
                 on_outputs: Callable[[Sequence[Any]], None] | None = None,
                 on_dead: Callable[[BaseException], None] | None = None,
                 on_stats: Callable[[EngineStats], None] | None = None,
                 _link: EngineLink | None = None, _stats: EngineStats | None = None) -> None:
        if max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        self.text_engine = text_engine
        self.max_queued_requests = max_queued_requests
        self.on_outputs = on_outputs
        self.on_dead = on_dead
        self.on_stats = on_stats
        self.error: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}     # touched on the event loop only
        self._adds: dict[str, asyncio.Future] = {}        # adds the loop has not acked yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link = _link
        self._decode = OutputDecoder() if _link is not None else None
        if text_engine is not None:
            self.stats = engine_stats(text_engine)
            self._commands: queue.SimpleQueue = queue.SimpleQueue()
            self._wakeup = threading.Event()
            self._thread = threading.Thread(target=self._run_thread, name="nanorun-engine",
                                            daemon=True)
        elif _link is not None:
            self.stats = _stats or EngineStats()
        else:
            raise ValueError("AsyncEngine needs a text_engine (or use AsyncEngine.spawn)")

    @classmethod
    def spawn(cls, model: str, engine_kwargs: dict, *, max_queued_requests: int,
              on_outputs: Callable[[Sequence[Any]], None] | None = None,
              timeout: float | None = None) -> tuple[AsyncEngine, dict]:
        """An AsyncEngine over a TextEngine.from_model(model, **engine_kwargs) built in a
        fresh engine process (spawned: no threads or CUDA state of this one are inherited),
        and the process's info (engine_core.engine_info: what it was built with). Returns
        once the model is loaded; raises RuntimeError with the engine's error if it cannot be
        built. The engine process logs at this process's level."""
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=engine_process_main, args=(theirs, model, engine_kwargs),
                              kwargs={"log_level": logging.getLogger().getEffectiveLevel()},
                              name="nanorun-engine", daemon=True)
        process.start()
        theirs.close()
        try:
            info = wait_ready(ours, process, timeout)
        except BaseException:
            process.kill()
            raise
        engine = cls(max_queued_requests=max_queued_requests, on_outputs=on_outputs,
                     _link=EngineLink(ours, process), _stats=info["stats"])
        return engine, info

    # -- event-loop side ----------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._link is not None:
            self._link.start(self._loop, self._on_messages)
        else:
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine loop (and its process); idempotent."""
        if self._link is not None:
            self._link.close(timeout)
        else:
            self._send(("stop",))
            if self._thread.is_alive():
                self._thread.join(timeout)

    @property
    def num_unfinished(self) -> int:
        """Requests added here and not yet ended (read on the event loop)."""
        return len(self._streams)

    async def add_request(self, request_id: str, prompt: Any, params: Any, *,
                          stream_interval: int | None = 1) -> RequestStream:
        """Queue a request; raises what TextEngine.add_request raises (ValueError, TypeError),
        QueueFullError past the bound, EngineDeadError once the engine has failed.
        stream_interval: how often the stream wakes (see RequestStream)."""
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
        stream = RequestStream(self, request_id, n, stream_interval)
        self._streams[request_id] = stream      # before the loop can send it anything
        acked = self._adds[request_id] = asyncio.get_running_loop().create_future()
        self._send(("add", request_id, prompt, params, time.perf_counter()))
        try:
            await acked
        except BaseException:
            self._adds.pop(request_id, None)
            if self._streams.pop(request_id, None) is not None:
                self._send(("abort", request_id))      # cancelled: the add may still land
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if self.error is None:
            self._send(("abort", request_id))

    def _send(self, command: tuple) -> None:
        if self._link is not None:
            self._link.send(command)    # never blocks: a full pipe only delays it
        else:
            self._commands.put(command)
            self._wakeup.set()

    def _on_messages(self, messages: list) -> None:
        """A batch of the engine process's messages, in order (EngineLink's reader)."""
        for message in messages:
            self._on_message(message)

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "acks":
            self._ack(message[1])
        elif kind == "step":
            _, outputs, stats = message
            self.stats = stats
            if self.on_stats is not None and (stats.iteration_tokens
                                               or stats.prefix_cache_queries):
                try:                     # metrics: as on_outputs below
                    self.on_stats(stats)
                except Exception:
                    logger.exception("recording metrics failed; serving on")
            if outputs:
                if self._decode is not None:
                    outputs = self._decode(outputs)
                if self.on_outputs is not None:
                    try:                 # metrics: a bug there must not stop the serving
                        self.on_outputs(outputs)
                    except Exception:
                        logger.exception("recording metrics failed; serving on")
                self._deliver(outputs)
        elif kind == "dead":
            if self.error is None:
                self.error = EngineDeadError(message[1])
                self._fail_all(self.error)
                if self.on_dead is not None:
                    self.on_dead(self.error)

    def _ack(self, acks: list) -> None:
        for request_id, error in acks:
            future = self._adds.pop(request_id, None)
            if future is None or future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                self._streams.pop(request_id, None)
                future.set_exception(error)

    def _deliver(self, outputs: Sequence[Any]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:           # aborted by its handler: nobody is listening
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _fail_all(self, error: BaseException) -> None:
        adds, self._adds = self._adds, {}
        for future in adds.values():      # adds it never took are refused, not left waiting
            if not future.done():
                future.set_exception(error)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)

    # -- engine thread (AsyncEngine(text_engine)) ---------------------------------------------
    def _run_thread(self) -> None:
        def emit(message: tuple) -> None:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self._on_message, message)
                except RuntimeError:     # the loop closed while we stepped: shutting down
                    pass

        EngineLoop(self.text_engine, emit).run(self._next_commands)

    def _next_commands(self, block: bool) -> list:
        if block:
            self._wakeup.wait()
        self._wakeup.clear()
        commands = []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands
