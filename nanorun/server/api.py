"""The FastAPI app: OpenAI's completions and chat completions, models, health and metrics.

Each handler turns its body into token ids and SamplingParams (a 400 for anything wrong, before
anything is queued), adds one engine request per prompt, and either awaits the final outputs
or streams every step's new text as server-sent events in OpenAI's chunk format, ending with
`data: [DONE]`. A client that goes away mid-stream cancels its generator, and closing it aborts
its requests; a non-streaming client that goes away is noticed by a watcher that polls the
connection.

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
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (BadRequest, ChatCompletionRequest, CompletionRequest, chat_logprobs,
                       check_unsupported, completion_logprobs, error_body, include_usage,
                       new_id, now, prompt_logprobs_json, requested_max_tokens,
                       sampling_params, usage)

DEFAULT_COMPLETION_MAX_TOKENS = 16      # OpenAI's (and vLLM's) default for /v1/completions
_DISCONNECT_POLL_S = 0.25


@dataclass
class ServerState:
    """What the handlers share."""

    engine: AsyncEngine
    metrics: ServerMetrics
    model_name: str
    tokenizer: Any            # nanorun.tokenizer.Tokenizer, or None (token ids only)
    max_model_len: int        # longest prompt + output a request may have
    stream_interval: int = 1  # a streamed choice's chunk every this many tokens


def build_app(engine: AsyncEngine, *, model_name: str, tokenizer: Any,
              max_model_len: int, stream_interval: int = 1) -> FastAPI:
    """The app over an AsyncEngine (not started: the app starts it while it is served).
    tokenizer encodes prompts here (None: token ids only); max_model_len is the engine's
    longest prompt + output; stream_interval: a streamed choice gets a chunk once it has this
    many new tokens (or has finished; its first tokens go at once), as SGLang's
    --stream-interval: fewer, larger chunks cost the server less per token."""
    if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) \
            or stream_interval < 1:
        raise ValueError(f"stream_interval must be a positive int, got {stream_interval!r}")
    metrics = ServerMetrics(model_name)
    engine.on_outputs = metrics.observe
    state = ServerState(engine, metrics, model_name, tokenizer, max_model_len, stream_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="nanorun", lifespan=lifespan)
    app.state.nanorun = state
    _add_error_handlers(app, metrics)
    _add_routes(app, state)
    return app


# -- errors ---------------------------------------------------------------------------------
def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, status), status_code=status)


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('msg')}",
                          "BadRequestError")
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":     # refused, never ignored
            return _error(400, f"{param} is not a field nanorun knows, so it is refused rather "
                               f"than ignored (docs/serving.md lists the fields)",
                          "BadRequestError", param)
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}",
                      "BadRequestError", param)

    @app.exception_handler(BadRequest)
    async def bad(_: Request, e: BadRequest) -> JSONResponse:
        return _error(400, str(e), "BadRequestError", e.param)

    @app.exception_handler(QueueFullError)
    async def full(_: Request, e: QueueFullError) -> JSONResponse:
        metrics.rejected.inc()
        return _error(503, str(e), "ServiceUnavailableError")

    @app.exception_handler(EngineDeadError)
    async def dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return _error(503, str(e), "ServiceUnavailableError")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        # Anything else (a length predictor that raised while adding, say) is the server's
        # fault, not the client's: a 500 in the same JSON, and the server goes on.
        return _error(500, f"{type(e).__name__}: {e}", "InternalServerError")

    @app.exception_handler(StarletteHTTPException)
    async def http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), "NotFoundError" if e.status_code == 404
                      else "BadRequestError")


# -- routes ---------------------------------------------------------------------------------
def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if state.engine.error is not None:
            return _error(503, str(state.engine.error), "ServiceUnavailableError")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(state.engine.stats), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": now(),
            "owned_by": "nanorun", "root": state.model_name, "parent": None,
            "max_model_len": state.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        _check(state, body)
        prompts = [_token_ids(state, p) for p in _prompt_list(body.prompt)]
        return await _serve(state, body, raw, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        _check(state, body)
        if state.tokenizer is None:
            raise BadRequest("this model has no tokenizer, so it cannot chat", "messages")
        try:       # templates write their own BOS: encoded without special tokens, as vLLM does
            ids = state.tokenizer.apply_chat_template(
                body.messages, add_generation_prompt=body.add_generation_prompt, tokenize=True,
                tools=body.tools)
        except ValueError as e:
            raise BadRequest(str(e), "messages") from None
        return await _serve(state, body, raw, [_nonempty(ids)], chat=True)


def _check(state: ServerState, body) -> None:
    """Refuse an unknown model or a field nanorun does not act on, before any work."""
    if body.model is not None and body.model != state.model_name:
        raise BadRequest(f"the model `{body.model}` does not exist; this server serves "
                         f"`{state.model_name}`", "model")
    check_unsupported(body)


def _prompt_list(prompt: Any) -> list:
    """A completions prompt as a list of prompts (str or token ids each)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise BadRequest("prompt is empty", "prompt")
    return list(prompt)


def _token_ids(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        return _nonempty(prompt)
    if state.tokenizer is None:
        raise BadRequest("this model has no tokenizer: send the prompt as token ids", "prompt")
    if not prompt:
        raise BadRequest("prompt is empty", "prompt")
    return _nonempty(state.tokenizer.encode(prompt))


def _nonempty(ids: list[int]) -> list[int]:
    if not ids:
        raise BadRequest("prompt is empty: it has no tokens", "prompt")
    return ids


async def _serve(state: ServerState, body, raw: Request, prompts: list[list[int]], *,
                 chat: bool):
    """Queue every prompt, then stream or answer once all have finished."""
    params = [sampling_params(body, _max_tokens(state, body, len(p), chat)) for p in prompts]
    request_id = new_id("chatcmpl" if chat else "cmpl")
    # A request that is not streamed has nothing to send before its end: its stream wakes
    # only then, not every step.
    interval = state.stream_interval if body.stream else None
    streams = await _add_all(state, request_id, prompts, params, interval)
    writer = _ChunkWriter(state, body, request_id, chat, sum(map(len, prompts)))
    if body.stream:
        return _EventStream(writer.events(streams), streams)
    try:
        finals = await _collect(streams, raw)
    finally:
        for s in streams:
            s.abort()
    if finals is None:
        return Response(status_code=499)          # the client is gone; nobody reads this
    return writer.response(finals)


class _EventStream(StreamingResponse):
    """A stream of server-sent events (each item of `events`, framed by _event); once the
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
            # at its yield: close it now (its cleanup, and _merge's tasks), not at collection.
            try:
                await self.body_iterator.aclose()
            except RuntimeError:     # it is running: it is ending by itself
                pass


def _event(data: str) -> bytes:
    """One server-sent event: `data: ...` and a blank line."""
    return ServerSentEvent(data=data, sep="\n").encode()


def _max_tokens(state: ServerState, body, prompt_len: int, chat: bool) -> Any:
    asked = requested_max_tokens(body)
    if asked is not None:
        return asked
    if not chat:
        return DEFAULT_COMPLETION_MAX_TOKENS
    left = state.max_model_len - prompt_len
    if left < 1:
        raise BadRequest(f"the prompt has {prompt_len} tokens, which leaves no room to "
                         f"generate within {state.max_model_len}", "messages")
    return left


async def _add_all(state: ServerState, request_id: str, prompts: list[list[int]],
                   params: list, interval: int | None) -> list[RequestStream]:
    """One engine request per prompt; if one is refused, those already added are aborted."""
    streams: list[RequestStream] = []
    try:
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            try:
                streams.append(await state.engine.add_request(rid, prompt, sp,
                                                              stream_interval=interval))
            except (ValueError, TypeError) as e:
                where = f"prompt {i}: " if len(prompts) > 1 else ""
                raise BadRequest(f"{where}{e}", "prompt" if "prompt" in str(e) else None) \
                    from None
    except BaseException:
        for s in streams:
            s.abort()
        raise
    return streams


async def _collect(streams: Sequence[RequestStream], raw: Request) -> list | None:
    """Every stream's final output, or None if the client disconnected first."""
    async def final(stream: RequestStream):
        last = None
        async for out in stream:
            last = out
        return last

    gathered = asyncio.ensure_future(asyncio.gather(*(final(s) for s in streams)))
    watcher = asyncio.ensure_future(_disconnected(raw))
    done, _ = await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if gathered not in done:
        gathered.cancel()
        return None
    return gathered.result()


async def _disconnected(raw: Request) -> None:
    while not await raw.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_S)


async def _merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
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


class _ChunkWriter:
    """OpenAI's JSON for one HTTP request's outputs: the whole response, or stream chunks."""

    def __init__(self, state: ServerState, body, request_id: str, chat: bool,
                 prompt_tokens: int) -> None:
        self.state, self.body, self.id, self.chat = state, body, request_id, chat
        self.n = body.n if isinstance(body.n, int) else 1
        self._finished: set[int] = set()       # choices whose finish chunk was sent
        self.created = now()
        self.prompt_tokens = prompt_tokens
        self.top_k = self._top_k(body)

    @staticmethod
    def _top_k(body) -> int | None:
        if isinstance(body, ChatCompletionRequest):
            return (body.top_logprobs or 0) if body.logprobs else None
        return body.logprobs

    def _decode(self, token_id: int) -> str:
        tok = self.state.tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if tok else str(token_id)

    def _logprobs(self, c, start: int, text_offset: int) -> dict | None:
        if self.top_k is None or c.logprobs is None:
            return None
        ids, lps = c.token_ids[start:], c.logprobs[start:]
        if self.chat:
            return chat_logprobs(ids, lps, self._decode, self.top_k)
        return completion_logprobs(ids, lps, self._decode, self.top_k, text_offset)

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.state.model_name}

    # -- one response ---------------------------------------------------------------------
    def response(self, finals: Sequence[Any]) -> JSONResponse:
        choices, produced = [], 0
        for i, out in enumerate(finals):
            for c in out.outputs:
                if c.finish_reason == "error":
                    return _error(500, f"generation failed: {c.error}", "InternalServerError")
                produced += len(c.token_ids)
                choices.append(self._choice(i * self.n + c.index, c, out))
        choices.sort(key=lambda ch: ch["index"])
        body = {**self._head(False), "choices": choices,
                "usage": usage(self.prompt_tokens, produced)}
        if self.chat:       # vLLM: on the response, null when not asked for (never absent)
            body["prompt_logprobs"] = prompt_logprobs_json(finals[0].prompt_logprobs)
        return JSONResponse(body)

    def _choice(self, index: int, c, out) -> dict:
        choice: dict = {"index": index}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        choice |= {"logprobs": self._logprobs(c, 0, 0), "finish_reason": c.finish_reason,
                   "stop_reason": c.stop_reason}
        if not self.chat:   # vLLM: on the choice, null when not asked for (never absent)
            choice["prompt_logprobs"] = prompt_logprobs_json(out.prompt_logprobs)
        return choice

    # -- a stream -------------------------------------------------------------------------
    async def events(self, streams: Sequence[RequestStream]) -> AsyncIterator[bytes]:
        """Every chunk as a server-sent event, then [DONE]; closing it early aborts the
        requests."""
        sent: dict[int, tuple[int, int]] = {}      # choice index -> (chars, tokens) sent
        with_usage = include_usage(self.body)
        # Every chunk is the same head, one choice, and (with usage) "usage": null: the head
        # and the tail are rendered once, the choice per chunk.
        head = json.dumps({**self._head(True), "choices": []})
        frame = (head[:-len("[]}")] + "[", "]" + (', "usage": null' if with_usage else "") + "}")
        try:
            async with aclosing(_merge(streams)) as outputs:   # its tasks end with this
                async for i, out in outputs:
                    for c in out.outputs:
                        chunk = self._chunk(i * self.n + c.index, c, sent, frame)
                        if chunk is not None:
                            yield _event(chunk)
            if with_usage:
                produced = sum(tokens for _, tokens in sent.values())
                yield _event(json.dumps({**self._head(True), "choices": [],
                                         "usage": usage(self.prompt_tokens, produced)}))
        except EngineDeadError as e:
            yield _event(json.dumps(error_body(str(e), "ServiceUnavailableError", None, 503)))
        finally:
            for s in streams:
                s.abort()
        yield _event("[DONE]")

    def _chunk(self, index: int, c, sent: dict, frame: tuple[str, str]) -> str | None:
        """The chunk for this choice's new tokens (its JSON between `frame`'s two parts);
        None when there are none and it goes on."""
        chars, tokens = sent.get(index, (0, 0))
        first = index not in sent
        if index in self._finished:         # its last chunk went out; n > 1 siblings go on
            return None
        if len(c.token_ids) == tokens and c.finish_reason is None and not first:
            return None
        if c.finish_reason is not None:
            self._finished.add(index)
        if c.finish_reason == "error":
            return json.dumps(error_body("generation failed for this request",
                                         "InternalServerError", None, 500))
        delta_text = c.text[chars:]
        sent[index] = (len(c.text), len(c.token_ids))
        choice: dict = {"index": index}
        if self.chat:
            delta = {"content": delta_text}
            if first:
                delta["role"] = "assistant"
            choice["delta"] = delta
        else:
            choice["text"] = delta_text
        choice |= {"logprobs": self._logprobs(c, tokens, chars),
                   "finish_reason": c.finish_reason}
        if c.finish_reason is not None:
            choice["stop_reason"] = c.stop_reason
        return frame[0] + json.dumps(choice) + frame[1]
