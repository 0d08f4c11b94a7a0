"""Server-sent events: one event's framing, the response that streams them and aborts its
requests however it ends, and the merge of several requests' streams into one.

The events are framed by sse-starlette (ServerSentEvent) and sent by Starlette's
StreamingResponse, not by sse-starlette's EventSourceResponse: that one enters an anyio cancel
scope (its send timeout) for every event, and under FastAPI it cost the server 55 us of CPU per
streamed chunk against StreamingResponse's 39 (bench/results/cpu/sse_stack.json). What it
adds is given up on purpose. Its keep-alive comment every 15 s (what ping=None meant): vLLM's
and SGLang's streams send none either, and a proxy in front must then allow a stream to be
silent for as long as a request can wait for its first token. And ending every stream at once
on SIGTERM: uvicorn now lets running streams go on for `nanorun serve --shutdown-timeout`
seconds, then cancels them (which aborts their requests), then the engine stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sse_starlette import ServerSentEvent
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .async_engine import RequestStream


class EventStream(StreamingResponse):
    """A stream of server-sent events (each item of `events`, framed by sse_event); once the
    response ends, however it ends, `streams` are aborted. (The generator's own cleanup aborts
    them too, but it never runs for a client that leaves before the first event.)"""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], streams: Sequence[RequestStream]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self._streams:
                s.abort()
            # A disconnect cancels the response inside a send, with the generator suspended
            # at its yield: close it now (its cleanup, and merge_streams' tasks), not at
            # collection.
            try:
                await self.body_iterator.aclose()
            except RuntimeError:     # it is running: it is ending by itself
                pass


def sse_event(data: str) -> bytes:
    """One server-sent event: `data: ...` and a blank line."""
    return ServerSentEvent(data=data, sep="\n").encode()


async def merge_streams(streams: Sequence[RequestStream]
                        ) -> AsyncIterator[tuple[int, Any]]:
    """(prompt index, output) from every stream as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except BaseException as e:     # noqa: BLE001 - handed to the consumer below
            queue.put_nowait((i, e))
        queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
