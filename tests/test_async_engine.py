"""AsyncEngine's hand-offs between the event loop and the engine thread, over a stand-in
TextEngine whose step the test holds open (no model, no server libraries)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from nanorun.server.async_engine import (AsyncEngine, EngineDeadError, QueueFullError,
                                         RequestStream)


class _HeldTextEngine:
    """Finishes every request in one step; step() blocks until `gate` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.in_step = threading.Event()
        self.pending: list[str] = []
        self.added: list[str] = []
        self.engine = SimpleNamespace(scheduler=SimpleNamespace(running=[], waiting=[]),
                                      kv_cache=SimpleNamespace(num_pages=1, num_free_pages=1))

    def add_request(self, request_id, prompt, params, arrival_time=None) -> None:
        self.added.append(request_id)
        self.pending.append(request_id)

    def abort_request(self, request_id) -> None:
        if request_id in self.pending:
            self.pending.remove(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.pending)

    def step(self):
        self.in_step.set()
        self.gate.wait()
        done, self.pending = self.pending, []
        return [SimpleNamespace(request_id=r, finished=True) for r in done]


def test_a_handler_cancelled_while_its_add_waits_does_not_kill_the_engine_thread():
    async def main():
        te = _HeldTextEngine()
        engine = AsyncEngine(te, max_queued_requests=8)
        engine.start()
        try:
            first = await engine.add_request("a", [1], None)
            await asyncio.get_running_loop().run_in_executor(None, te.in_step.wait, 5)
            # The thread is inside a step: "b"'s add waits in the command queue.
            cancelled = asyncio.ensure_future(engine.add_request("b", [1], None))
            await asyncio.sleep(0.05)
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
            te.gate.set()
            assert [o.request_id async for o in first] == ["a"]
            # The engine thread is still serving, and "b" (cancelled first) never ran.
            third = await asyncio.wait_for(engine.add_request("c", [1], None), 5)
            assert [o.request_id async for o in third] == ["c"]
            assert te.added == ["a", "c"]
        finally:
            te.gate.set()
            engine.shutdown()

    asyncio.run(main())


def test_an_add_queued_when_a_step_fails_is_refused_not_left_waiting():
    class _Failing(_HeldTextEngine):
        def step(self):
            super().step()
            raise RuntimeError("planted")

    async def main():
        te = _Failing()
        engine = AsyncEngine(te, max_queued_requests=8)
        engine.start()
        try:
            first = await engine.add_request("a", [1], None)
            await asyncio.get_running_loop().run_in_executor(None, te.in_step.wait, 5)
            queued = asyncio.ensure_future(engine.add_request("b", [1], None))
            await asyncio.sleep(0.05)
            te.gate.set()
            with pytest.raises(EngineDeadError):
                await anext(first)
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(queued, 5)
        finally:
            te.gate.set()
            engine.shutdown()

    asyncio.run(main())


def test_the_queue_bound_counts_sequences_so_n_cannot_overrun_it():
    async def main():
        te = _HeldTextEngine()
        engine = AsyncEngine(te, max_queued_requests=4)
        engine.start()
        try:
            await engine.add_request("a", [1], SimpleNamespace(n=3))
            with pytest.raises(QueueFullError):          # 3 + 2 sequences > 4
                await asyncio.wait_for(engine.add_request("b", [1], SimpleNamespace(n=2)), 5)
            with pytest.raises(ValueError, match="n=5"):   # could never be queued
                await engine.add_request("c", [1], SimpleNamespace(n=5))
            assert te.added == ["a"]
        finally:
            te.gate.set()
            engine.shutdown()

    asyncio.run(main())


def test_a_failing_metrics_callback_does_not_stop_the_serving():
    def broken(outputs) -> None:
        raise ZeroDivisionError("planted")

    async def main():
        te = _HeldTextEngine()
        te.gate.set()
        engine = AsyncEngine(te, max_queued_requests=8, on_outputs=broken)
        engine.start()
        try:
            for rid in ("a", "b"):
                stream = await asyncio.wait_for(engine.add_request(rid, [1], None), 5)
                outs = await asyncio.wait_for(_collect(stream), 5)
                assert [o.request_id for o in outs] == [rid]
            assert engine.error is None
        finally:
            engine.shutdown()

    asyncio.run(main())


async def _collect(stream) -> list:
    return [o async for o in stream]


def _out(*seqs, finished=False):
    """A cumulative output: seqs are (tokens so far, finish_reason) per sequence."""
    return SimpleNamespace(finished=finished, outputs=[
        SimpleNamespace(token_ids=list(range(n)), finish_reason=r) for n, r in seqs])


def _woken(stream, outputs) -> list[int]:
    """Which of `outputs`, put one per step, a consumer that keeps up would be woken for."""
    woken = []
    for i, out in enumerate(outputs):
        stream.put(out)
        if stream._latest is out:
            stream._take()                 # as __anext__ takes it
            woken.append(i)
    return woken


def test_a_consumer_that_falls_behind_counts_from_what_it_took():
    """Interval 3, an output updated in place (as the server's decoder does): woken at 1
    token, taken late at 2; the next chunk is due at 2 + 3 tokens, not at 1 + 3."""
    stream = RequestStream(None, "r", 1, 3)
    out = _out((1, None))
    stream.put(out)
    out.outputs[0].token_ids.append(1)      # one more step before the consumer reads
    assert stream._take() is out
    for n in (3, 4):
        out.outputs[0].token_ids.append(n)
        stream.put(out)
        assert stream._latest is None
    out.outputs[0].token_ids.append(5)
    stream.put(out)
    assert stream._latest is out


@pytest.mark.parametrize("interval, want", [
    (1, [1, 2, 3, 4, 5, 6]),
    (3, [1, 4, 6]),           # the first token at once, then every 3, then the finish
    (None, [6]),              # not streamed: only the end
])
def test_a_stream_wakes_its_consumer_every_interval_tokens(interval, want):
    """Output i holds i tokens (output 0, none yet, has nothing to send); output 6 ends."""
    stream = RequestStream(None, "r", 1, interval)
    outputs = [_out((n, None)) for n in range(6)] + [_out((6, "length"), finished=True)]
    assert _woken(stream, outputs) == want


def test_a_sibling_that_finishes_wakes_the_consumer_at_once():
    """n = 2 at interval 4: sequence 1 stopping (a stop string) is news to send now."""
    stream = RequestStream(None, "r", 2, 4)
    outputs = [_out((1, None), (1, None)), _out((2, None), (2, "stop")),
               _out((3, None), (2, "stop")), _out((6, None), (2, "stop"))]
    assert _woken(stream, outputs) == [0, 1, 3]


def test_an_error_is_kept_over_later_outputs():
    stream = RequestStream(None, "r", 1, 4)
    stream.put(EngineDeadError("gone"))
    stream.put(_out((3, None)))

    async def main():
        with pytest.raises(EngineDeadError):
            await anext(stream)

    asyncio.run(main())


def test_a_failed_step_on_rank_0_tells_the_other_ranks_to_stop(monkeypatch):
    """Tensor-parallel serving: the other ranks wait in a broadcast for rank 0's next
    commands; when rank 0's step fails it sends them a stop instead of leaving them there
    until gloo's timeout."""
    import multiprocessing

    from nanorun import text_engine as text_engine_module
    from nanorun.server import engine_core

    class _Failing(_HeldTextEngine):
        def step(self):
            raise RuntimeError("planted")

    class _Control(engine_core.ControlGroup):
        def __init__(self):
            self.shared = []

        def share(self, commands):
            self.shared.append(commands)
            return commands

    control = _Control()
    failing = _Failing()
    failing.engine.shutdown = lambda: None
    monkeypatch.setattr(text_engine_module.TextEngine, "from_model",
                        classmethod(lambda cls, model, **kw: failing))
    monkeypatch.setattr(engine_core.ControlGroup, "of", classmethod(lambda cls, core: control))
    failing.engine.max_model_len = 64
    failing.engine.kv_cache.capacity_tokens = 64
    ours, theirs = multiprocessing.Pipe()
    ours.send(("add", "a", [1], None, 0.0))
    engine_core.engine_process_main(theirs, "stub", {})
    messages = []
    while ours.poll(0):
        messages.append(ours.recv()[0])
    assert messages == ["ready", "acks", "dead"]
    assert control.shared[-1] == [("stop",)]
