"""The FastAPI app: OpenAI's completions and chat completions, models, tokenize and
detokenize, health, version and metrics (vLLM's routes, docs/serving.md lists them).

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
import hmac
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sse_starlette import ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (BadRequest, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest, chat_logprobs, check_unsupported, completion_logprobs,
                       echo_only, error_body, include_usage, new_id, now,
                       prompt_logprobs_json, requested_max_tokens, sampling_params, usage)
from .settings import ServerSettings

DEFAULT_COMPLETION_MAX_TOKENS = 16      # OpenAI's (and vLLM's) default for /v1/completions
_DISCONNECT_POLL_S = 0.25
# Keys a request's chat_template_kwargs may not set: the server passes them itself.
_RESERVED_TEMPLATE_KWARGS = ("messages", "tokenize", "chat_template", "tools", "documents",
                             "add_generation_prompt", "continue_final_message")

logger = logging.getLogger("nanorun.server")


@dataclass
class ServerState:
    """What the handlers share."""

    engine: AsyncEngine
    metrics: ServerMetrics
    settings: ServerSettings
    tokenizer: Any            # nanorun.tokenizer.Tokenizer, or None (token ids only)
    max_model_len: int        # longest prompt + output a request may have
    vocab_size: int           # the model's: what logprobs -1 means
    stream_interval: int = 1  # a streamed choice's chunk every this many tokens

    @property
    def model_name(self) -> str:
        return self.settings.model_name


@dataclass(frozen=True)
class Cors:
    """--allowed-origins, --allowed-methods, --allowed-headers, --allow-credentials (vLLM's
    defaults: any origin, method and header, no credentials)."""

    origins: tuple[str, ...] = ("*",)
    methods: tuple[str, ...] = ("*",)
    headers: tuple[str, ...] = ("*",)
    credentials: bool = False


def build_app(engine: AsyncEngine, settings: ServerSettings, *, tokenizer: Any,
              max_model_len: int, vocab_size: int, stream_interval: int = 1,
              cache_info: dict | None = None, root_path: str = "",
              cors: Cors = Cors()) -> FastAPI:
    """The app over an AsyncEngine (not started: the app starts it while it is served).
    tokenizer encodes prompts here (None: token ids only); max_model_len is the engine's
    longest prompt + output; stream_interval: a streamed choice gets a chunk once it has this
    many new tokens (or has finished; its first tokens go at once), as SGLang's
    --stream-interval: fewer, larger chunks cost the server less per token. cache_info: the
    KV cache's settings for vllm:cache_config_info. root_path: the prefix a proxy serves
    the app under (--root-path)."""
    if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) \
            or stream_interval < 1:
        raise ValueError(f"stream_interval must be a positive int, got {stream_interval!r}")
    metrics = ServerMetrics(settings.model_name, max_model_len, cache_info or {})
    engine.on_outputs, engine.on_stats = metrics.observe, metrics.observe_stats
    state = ServerState(engine, metrics, settings, tokenizer, max_model_len, vocab_size,
                        stream_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="nanorun", lifespan=lifespan, root_path=root_path)
    app.state.nanorun = state
    _add_error_handlers(app, metrics)
    _add_routes(app, state)
    if settings.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(CORSMiddleware, allow_origins=list(cors.origins),  # outermost: 401s
                       allow_methods=list(cors.methods), allow_headers=list(cors.headers),
                       allow_credentials=cors.credentials)                # carry CORS too
    return app


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on the /v1 routes (below --root-path), as vLLM checks
    --api-key: anything else there is a 401; /health, /ping, /metrics, /version, /tokenize
    and /detokenize stay open, and so do CORS preflights (OPTIONS)."""

    def __init__(self, app, keys: tuple[str, ...]) -> None:
        self.app = app
        self._keys = [f"Bearer {k}".encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and \
                _route_path(scope).startswith("/v1") and not self._authorized(scope):
            body = error_body("a valid API key is needed: send `Authorization: Bearer <key>` "
                              "(the server's --api-key)", "AuthenticationError", None, 401)
            await JSONResponse(body, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        # Compare every key in constant time: how long a refusal takes says nothing.
        return any([hmac.compare_digest(given, k) for k in self._keys])


def _route_path(scope: Scope) -> str:
    root, path = scope.get("root_path", ""), scope["path"]
    return path[len(root):] if root and path.startswith(root) else path


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

    app.add_api_route("/ping", health, methods=["GET", "POST"])   # SageMaker's name for it

    @app.get("/version")
    async def version() -> dict:
        from .. import __version__

        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(state.engine.stats), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(state, name)
                                           for name in state.settings.served_model_names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> JSONResponse:
        if model not in state.settings.served_model_names:
            return _error(404, f"the model `{model}` does not exist; this server serves "
                               f"{_names(state)}", "NotFoundError", "model")
        return JSONResponse(_model_card(state, model))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        _check(state, body)
        add_special = body.add_special_tokens is not False
        prompts = [_truncated(state, _prompt(state, p, add_special), body)
                   for p in _prompt_list(body.prompt)]
        return await _serve(state, body, raw, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        _check(state, body)
        ids = _render_chat(state, body, body.messages, body.add_generation_prompt,
                           body.add_special_tokens)
        prompt = _truncated(state, _Prompt(ids, None), body)
        return await _serve(state, body, raw, [prompt], chat=True)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        _check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequest("give exactly one of prompt (text) and messages (a chat)",
                             "prompt" if body.prompt is None else "messages")
        if body.prompt is not None:
            for name in ("chat_template", "chat_template_kwargs", "tools"):
                if getattr(body, name) is not None:
                    raise BadRequest(f"{name} is for messages, not a prompt", name)
            ids = _need_tokenizer(state, "prompt").encode(
                body.prompt, add_special_tokens=body.add_special_tokens is not False)
        else:
            if body.continue_final_message and body.add_generation_prompt:
                raise BadRequest("continue_final_message and add_generation_prompt cannot "
                                 "both be true", "continue_final_message")
            ids = _render_chat(state, body, body.messages, body.add_generation_prompt,
                               bool(body.add_special_tokens))
        strs = state.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        _check_model(state, body.model)
        bad = [t for t in body.tokens if not 0 <= t < state.vocab_size]
        if bad:
            raise BadRequest(f"tokens {bad[:5]} are outside the vocabulary [0, "
                             f"{state.vocab_size})", "tokens")
        return {"prompt": _need_tokenizer(state, "tokens").decode(body.tokens,
                                                                  skip_special_tokens=False)}


def _model_card(state: ServerState, name: str) -> dict:
    return {"id": name, "object": "model", "created": now(), "owned_by": "nanorun",
            "root": state.model_name, "parent": None, "max_model_len": state.max_model_len}


def _names(state: ServerState) -> str:
    return ", ".join(f"`{n}`" for n in state.settings.served_model_names)


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.settings.served_model_names:
        raise BadRequest(f"the model `{model}` does not exist; this server serves "
                         f"{_names(state)}", "model")


def _check(state: ServerState, body) -> None:
    """Refuse an unknown model or a field nanorun does not act on, before any work."""
    _check_model(state, body.model)
    check_unsupported(body)


def _need_tokenizer(state: ServerState, param: str):
    if state.tokenizer is None:
        raise BadRequest("this model has no tokenizer: send token ids", param)
    return state.tokenizer


def _render_chat(state: ServerState, body, messages: list, add_generation_prompt: bool,
                 add_special_tokens: bool) -> list[int]:
    """The chat's token ids through the request's or the server's or the model's template
    (a request's own only with --trust-request-chat-template, as vLLM)."""
    tokenizer = _need_tokenizer(state, "messages")
    kwargs = dict(body.chat_template_kwargs or {})
    reserved = sorted(set(kwargs) & set(_RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise BadRequest(f"chat_template_kwargs may not set {reserved}: they are request "
                         f"fields of their own", "chat_template_kwargs")
    if body.chat_template is not None and not state.settings.trust_request_chat_template:
        raise BadRequest("a request's own chat_template needs the server to be started with "
                         "--trust-request-chat-template (as vLLM)", "chat_template")
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=body.continue_final_message, tools=body.tools,
            chat_template=body.chat_template or state.settings.chat_template, **kwargs)
    except ValueError as e:
        param = "chat_template" if "not valid Jinja" in str(e) else "messages"
        raise BadRequest(str(e), param) from None
    # Templates write their own BOS: encoded without special tokens unless asked, as vLLM.
    return _nonempty(tokenizer.encode(text, add_special_tokens=add_special_tokens))


@dataclass
class _Prompt:
    """One prompt's token ids, and its text when it came as text (for echo)."""

    ids: list[int]
    text: str | None


def _prompt_list(prompt: Any) -> list:
    """A completions prompt as a list of prompts (str or token ids each)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise BadRequest("prompt is empty", "prompt")
    return list(prompt)


def _prompt(state: ServerState, prompt: str | list[int], add_special_tokens: bool) -> _Prompt:
    if isinstance(prompt, list):
        return _Prompt(_nonempty(prompt), None)
    if state.tokenizer is None:
        raise BadRequest("this model has no tokenizer: send the prompt as token ids", "prompt")
    if not prompt:
        raise BadRequest("prompt is empty", "prompt")
    return _Prompt(_nonempty(state.tokenizer.encode(prompt, add_special_tokens)), prompt)


def _truncated(state: ServerState, prompt: _Prompt, body) -> _Prompt:
    """truncate_prompt_tokens: the prompt's last N tokens (-1: max_model_len), as vLLM keeps
    them; the engine would cut them alike, but the usage, echo and max_tokens need them
    here."""
    k = body.truncate_prompt_tokens          # checked by check_unsupported
    if k is None:
        return prompt
    if k == -1:
        k = state.max_model_len
    if k > state.max_model_len:
        raise BadRequest(f"truncate_prompt_tokens ({k}) is greater than max_model_len "
                         f"({state.max_model_len}): select a smaller truncation size",
                         "truncate_prompt_tokens")
    if len(prompt.ids) <= k:
        return prompt
    return _Prompt(prompt.ids[-k:], None)


def _nonempty(ids: list[int]) -> list[int]:
    if not ids:
        raise BadRequest("prompt is empty: it has no tokens", "prompt")
    return ids


async def _serve(state: ServerState, body, raw: Request, prompts: list[_Prompt], *,
                 chat: bool):
    """Queue every prompt, then stream or answer once all have finished."""
    defaults = dict(state.settings.generation_defaults)
    default_max = defaults.pop("max_tokens", None)
    params = [sampling_params(body, 1 if echo_only(body) else
                              _max_tokens(state, body, len(p.ids), chat, default_max),
                              defaults=defaults)
              for p in prompts]
    request_id = new_id("chatcmpl" if chat else "cmpl")
    if state.settings.enable_log_requests:
        for p, sp in zip(prompts, params):
            logger.info("request %s: %d prompt tokens, %s", request_id, len(p.ids), sp)
    # A request that is not streamed has nothing to send before its end: its stream wakes
    # only then, not every step.
    interval = state.stream_interval if body.stream else None
    engine_prompts = [p.ids if body.cache_salt is None else
                      {"prompt_token_ids": p.ids, "cache_salt": body.cache_salt}
                      for p in prompts]
    streams = await _add_all(state, request_id, engine_prompts, params, interval)
    state.metrics.observe_params(params)
    writer = _ChunkWriter(state, body, request_id, chat, prompts)
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


def _max_tokens(state: ServerState, body, prompt_len: int, chat: bool,
                default_max: int | None) -> Any:
    """The request's max_tokens, else the endpoint's default; a generation config's
    max_new_tokens caps either, as vLLM applies it."""
    asked = requested_max_tokens(body)
    if asked is None:
        if not chat:
            asked = DEFAULT_COMPLETION_MAX_TOKENS
        else:
            asked = state.max_model_len - prompt_len
            if asked < 1:
                raise BadRequest(f"the prompt has {prompt_len} tokens, which leaves no room "
                                 f"to generate within {state.max_model_len}", "messages")
    if default_max is not None and isinstance(asked, int) and not isinstance(asked, bool):
        return min(asked, default_max)
    return asked


async def _add_all(state: ServerState, request_id: str, prompts: list,
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
                raise BadRequest(f"{where}{e}", _param_of(str(e))) from None
    except BaseException:
        for s in streams:
            s.abort()
        raise
    return streams


def _param_of(message: str) -> str | None:
    """The field an engine's refusal names first (its messages start with it)."""
    for name in ("prompt_logprobs", "logprobs", "prompt", "stop_token_ids", "max_tokens",
                 "truncate_prompt_tokens", "cache_salt", "structured_outputs", "logit_bias",
                 "allowed_token_ids", "bad_words"):
        if message.startswith(name):
            return name
    return "prompt" if "prompt" in message else None


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
    """OpenAI's JSON for one HTTP request's outputs: the whole response, or stream chunks.

    What vLLM adds on request: echo (completions: the prompt's text, and with logprobs its
    logprobs, before the output's; chat: the last message's content before the reply when it
    has the reply's role), return_token_ids (prompt_token_ids, and each choice's token_ids;
    in a stream the prompt's with a choice's first chunk, the new ones with each),
    return_tokens_as_token_ids (logprobs' tokens as 'token_id:<id>'), and a stream's usage
    on every chunk (continuous_usage_stats)."""

    def __init__(self, state: ServerState, body, request_id: str, chat: bool,
                 prompts: Sequence[_Prompt]) -> None:
        self.state, self.body, self.id, self.chat = state, body, request_id, chat
        self.prompts = prompts
        self.n = body.n if isinstance(body.n, int) else 1
        self._finished: set[int] = set()       # choices whose finish chunk was sent
        self.created = now()
        self.prompt_tokens = sum(len(p.ids) for p in prompts)
        self.top_k = self._top_k(body, state.vocab_size)
        asked = body.return_tokens_as_token_ids
        self.as_ids = state.settings.return_tokens_as_token_ids if asked is None else asked
        self.token_ids = bool(body.return_token_ids)
        self.echo_only = echo_only(body)
        self.usage, self.continuous_usage = include_usage(body, state.settings.force_include_usage)
        self.role = self._role(body, state.settings.response_role) if chat else None
        self._echo = [self._echo_text(body, p) for p in prompts] if body.echo else None

    @staticmethod
    def _top_k(body, vocab_size: int) -> int | None:
        if isinstance(body, ChatCompletionRequest):
            k = (body.top_logprobs or 0) if body.logprobs else None
        else:
            k = body.logprobs
        return vocab_size if k == -1 else k

    @staticmethod
    def _role(body, response_role: str) -> str:
        """vLLM's: the server's response role after a generation prompt, else the role of the
        message being continued."""
        if body.add_generation_prompt or not body.messages:
            return response_role
        return str(body.messages[-1].get("role", response_role))

    def _echo_text(self, body, prompt: _Prompt) -> str:
        if not self.chat:
            if prompt.text is not None:
                return prompt.text
            tok = self.state.tokenizer
            return tok.decode(prompt.ids, skip_special_tokens=False) if tok else ""
        last = body.messages[-1]
        if last.get("role") != self.role:
            return ""
        content = last.get("content") or ""
        if isinstance(content, list):      # text parts, joined as the template saw them
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)

    def _decode(self, token_id: int) -> str:
        tok = self.state.tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if tok else str(token_id)

    def _logprobs(self, c, start: int, text_offset: int, out=None) -> dict | None:
        """The logprobs of c's tokens from `start`; with `out` (echo, completions), the
        prompt's before them."""
        if self.top_k is None or c.logprobs is None:
            return None
        ids, lps = c.token_ids[start:], c.logprobs[start:]
        if self.echo_only:
            ids, lps = [], []
        if self.chat:
            return chat_logprobs(ids, lps, self._decode, self.top_k, self.as_ids)
        if out is not None:
            prompt_lps = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            ids, lps = [*out.prompt_token_ids, *ids], [*prompt_lps, *lps]
        return completion_logprobs(ids, lps, self._decode, self.top_k, text_offset,
                                   self.as_ids)

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
                choices.append(self._choice(i, i * self.n + c.index, c, out))
        choices.sort(key=lambda ch: ch["index"])
        cached = self._cached(out.num_cached_tokens for out in finals)
        body = {**self._head(False), "choices": choices,
                "usage": usage(self.prompt_tokens, produced, cached)}
        if self.chat:       # vLLM: on the response, null when not asked for (never absent)
            body["prompt_logprobs"] = prompt_logprobs_json(finals[0].prompt_logprobs)
            body["prompt_token_ids"] = self.prompts[0].ids if self.token_ids else None
        return JSONResponse(body)

    def _choice(self, prompt: int, index: int, c, out) -> dict:
        choice: dict = {"index": index}
        text = "" if self.echo_only else c.text
        echo = self._echo[prompt] if self._echo is not None else ""
        if self.chat:
            choice["message"] = {"role": self.role, "content": echo + text}
        else:
            choice["text"] = echo + text
        logprobs = self._logprobs(c, 0, 0, out if self._echo is not None else None)
        choice |= {"logprobs": logprobs, "finish_reason": c.finish_reason,
                   "stop_reason": c.stop_reason,
                   "token_ids": self._output_ids(c.token_ids) if self.token_ids else None}
        if not self.chat:   # vLLM: on the choice, null when not asked for (never absent)
            choice["prompt_logprobs"] = prompt_logprobs_json(out.prompt_logprobs)
            choice["prompt_token_ids"] = self.prompts[prompt].ids if self.token_ids else None
        return choice

    def _cached(self, per_prompt) -> int | None:
        """The usage's cached_tokens (--enable-prompt-tokens-details; else None)."""
        if not self.state.settings.enable_prompt_tokens_details:
            return None
        return sum(n or 0 for n in per_prompt)

    def _output_ids(self, ids: Sequence[int]) -> list[int]:
        return [] if self.echo_only else list(ids)

    # -- a stream -------------------------------------------------------------------------
    async def events(self, streams: Sequence[RequestStream]) -> AsyncIterator[bytes]:
        """Every chunk as a server-sent event, then [DONE]; closing it early aborts the
        requests."""
        sent: dict[int, tuple[int, int]] = {}      # choice index -> (chars, tokens) sent
        cached: dict[int, int | None] = {}         # prompt -> its tokens the cache held
        # Most chunks are the same head, one choice, and (with usage) "usage": null: the head
        # and the tail are rendered once, the choice per chunk.
        head = json.dumps({**self._head(True), "choices": []})
        frame = (head[:-len("[]}")] + "[", "]" + (', "usage": null' if self.usage else "") + "}")
        try:
            async with aclosing(_merge(streams)) as outputs:   # its tasks end with this
                async for i, out in outputs:
                    cached[i] = out.num_cached_tokens
                    for c in out.outputs:
                        chunk = self._chunk(i, i * self.n + c.index, c, out, sent, frame)
                        if chunk is not None:
                            yield _event(chunk)
            if self.usage:
                produced = sum(tokens for _, tokens in sent.values())
                yield _event(json.dumps({**self._head(True), "choices": [],
                                         "usage": usage(self.prompt_tokens, produced,
                                                        self._cached(cached.values()))}))
        except EngineDeadError as e:
            yield _event(json.dumps(error_body(str(e), "ServiceUnavailableError", None, 503)))
        finally:
            for s in streams:
                s.abort()
        yield _event("[DONE]")

    def _chunk(self, prompt: int, index: int, c, out, sent: dict,
               frame: tuple[str, str]) -> str | None:
        """The chunk for this choice's new tokens (its JSON between `frame`'s two parts, when
        it has nothing of its own at the top level); None when there are none and it goes
        on."""
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
        delta_text = "" if self.echo_only else c.text[chars:]
        sent[index] = (len(c.text), len(c.token_ids))
        echo = self._echo[prompt] if first and self._echo is not None else ""
        choice: dict = {"index": index}
        if self.chat:
            delta = {"content": echo + delta_text}
            if first:
                delta["role"] = self.role
            choice["delta"] = delta
        else:
            choice["text"] = echo + delta_text
        echo_from = out if first and self._echo is not None and not self.chat else None
        offset = chars + (len(self._echo[prompt]) if self._echo is not None and not first
                          else 0)
        choice |= {"logprobs": self._logprobs(c, tokens, 0 if first else offset, echo_from),
                   "finish_reason": c.finish_reason}
        if c.finish_reason is not None:
            choice["stop_reason"] = c.stop_reason
        top: dict = {}          # what this chunk has beside its choice (vLLM's places)
        if self.token_ids:
            choice["token_ids"] = self._output_ids(c.token_ids[tokens:])
            if first:
                (top if self.chat else choice)["prompt_token_ids"] = self.prompts[prompt].ids
        if not top and not self.continuous_usage:
            return frame[0] + json.dumps(choice) + frame[1]
        chunk = {**self._head(True), **top, "choices": [choice]}
        if self.continuous_usage:
            chunk["usage"] = usage(len(self.prompts[prompt].ids), len(c.token_ids))
        elif self.usage:
            chunk["usage"] = None
        return json.dumps(chunk)
