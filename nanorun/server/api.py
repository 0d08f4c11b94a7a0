"""The FastAPI app: OpenAI's completions and chat completions, models, tokenize and
detokenize, health, version and metrics (vLLM's routes, docs/serving.md lists them).

build_app puts together the routes, the error handlers (every error in OpenAI's JSON), the
API-key check (auth.py) and CORS. Each generating handler turns its body into prompts
(prompts.py) and hands them to serving.serve, which queues them (a 400 for anything wrong,
before anything is queued) and answers with the final outputs or streams every step's new
text as server-sent events in OpenAI's chunk format (responses.py, streaming.py), ending with
`data: [DONE]`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import AsyncEngine, EngineDeadError, QueueFullError
from .auth import ApiKeyMiddleware
from .metrics import CONTENT_TYPE, ServerMetrics
from .prompts import (Prompt, need_tokenizer, prompt_list, render_chat, tokenize_body,
                      tokenize_prompt, truncated)
from .protocol import (BadRequest, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest, check_unsupported, now)
from .responses import error_response
from .serving import serve
from .settings import ServerSettings
from .state import ServerState


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



# -- errors ---------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}",
                                  "BadRequestError")
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":     # refused, never ignored
            return error_response(400, f"{param} is not a field nanorun knows, so it is "
                                       f"refused rather than ignored (docs/serving.md lists "
                                       f"the fields)", "BadRequestError", param)
        return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}",
                              "BadRequestError", param)

    @app.exception_handler(BadRequest)
    async def bad(_: Request, e: BadRequest) -> JSONResponse:
        return error_response(400, str(e), "BadRequestError", e.param)

    @app.exception_handler(QueueFullError)
    async def full(_: Request, e: QueueFullError) -> JSONResponse:
        metrics.rejected.inc()
        return error_response(503, str(e), "ServiceUnavailableError")

    @app.exception_handler(EngineDeadError)
    async def dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return error_response(503, str(e), "ServiceUnavailableError")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        # Anything else (a length predictor that raised while adding, say) is the server's
        # fault, not the client's: a 500 in the same JSON, and the server goes on.
        return error_response(500, f"{type(e).__name__}: {e}", "InternalServerError")

    @app.exception_handler(StarletteHTTPException)
    async def http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail),
                              "NotFoundError" if e.status_code == 404 else "BadRequestError")


# -- routes ---------------------------------------------------------------------------------
def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if state.engine.error is not None:
            return error_response(503, str(state.engine.error), "ServiceUnavailableError")
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
            return error_response(404, f"the model `{model}` does not exist; this server "
                                       f"serves {_names(state)}", "NotFoundError", "model")
        return JSONResponse(_model_card(state, model))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        _check(state, body)
        add_special = body.add_special_tokens is not False
        prompts = [truncated(state, tokenize_prompt(state, p, add_special), body)
                   for p in prompt_list(body.prompt)]
        return await serve(state, body, raw, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        _check(state, body)
        ids = render_chat(state, body, body.messages, body.add_generation_prompt,
                          body.add_special_tokens)
        prompt = truncated(state, Prompt(ids, None), body)
        return await serve(state, body, raw, [prompt], chat=True)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        _check_model(state, body.model)
        ids = tokenize_body(state, body)
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
        return {"prompt": need_tokenizer(state, "tokens").decode(body.tokens,
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
