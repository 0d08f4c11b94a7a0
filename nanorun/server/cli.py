"""`nanorun serve MODEL`: the OpenAI-compatible server.

FastAPI, uvicorn, sse-starlette and prometheus_client are imported inside the command only,
so `nanorun --help` and `import nanorun` work where the [serve] extra is not installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .. import options
from ..options import add_engine_arguments
from .settings import ServerSettings, api_keys, generation_defaults, load_chat_template

DEFAULT_MAX_QUEUED_REQUESTS = 1024
DEFAULT_SHUTDOWN_TIMEOUT_S = 10     # well inside Kubernetes' default 30 s grace period
# Once the engine has died, the server answers 503 for this long, then exits 1 (a supervisor
# restarts it), as vLLM's API server does once its EngineCore has died (its watchdog looks
# every 5 s).
ENGINE_DEAD_EXIT_S = 5.0
EXIT_ENGINE_DEAD = 1
EXIT_STARTUP_FAILURE = 3            # uvicorn's, when it could not listen

logger = logging.getLogger("nanorun.server")

# EngineConfig fields that are not flags of `nanorun serve`, and why.
SERVE_ABSENT = {"role": "a prefill or decode engine needs a KV connector: "
                        "`python -m nanorun.disagg` runs such pairs"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve MODEL on /v1/completions, /v1/chat/completions, /v1/models, /health "
                    "and /metrics (see docs/serving.md). Install with pip install -e '.[serve]'.")
    p.add_argument("model", help="a Hugging Face model directory (its tokenizer.json and chat "
                                 "template are used), a GGUF file, a Hugging Face Hub id "
                                 "(org/name), or a preset name (token-id prompts only)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model names clients may send and /v1/models lists; answers carry "
                        "the first (default: MODEL's directory name)")
    p.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                   help="requests allowed to wait for their first step; past it the server "
                        "answers 503 at once")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="a streamed choice gets a chunk once it has this many new tokens (or "
                        "has finished; the first tokens go at once): fewer, larger chunks "
                        "cost the server less per token")
    p.add_argument("--shutdown-timeout", type=int, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help="on SIGTERM, seconds the running requests may go on before they are "
                        "cancelled (new connections are refused at once)")
    p.add_argument("--tokenizer", default=None,
                   help="a directory, GGUF file or Hub id whose tokenizer to use instead of "
                        "MODEL's")
    p.add_argument("--revision", default=None,
                   help="the branch, tag or commit of a Hub id (default: main)")
    engine = p.add_argument_group(
        "engine options (EngineConfig's fields; --tensor-parallel-size N runs N of `nanorun "
        "serve` under `torchrun --nproc-per-node N`: rank 0 serves HTTP, every rank steps "
        "alike)")
    add_engine_arguments(engine, absent=SERVE_ABSENT)
    _add_http_arguments(p.add_argument_group("HTTP server (vLLM's flags of these names)"))
    p.set_defaults(func=run)


def _json_list(value: str) -> list[str]:
    out = json.loads(value)
    if not isinstance(out, list) or not all(isinstance(v, str) for v in out):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
    return out


def _add_http_arguments(g) -> None:
    g.add_argument("--api-key", nargs="+", default=None,
                   help="the /v1 routes answer 401 unless a request sends `Authorization: "
                        "Bearer <one of these>` (default: NANORUN_API_KEY, else VLLM_API_KEY, "
                        "else no key)")
    g.add_argument("--enable-force-include-usage", action="store_true",
                   help="every stream ends with a usage chunk, as if it had asked with "
                        "stream_options.include_usage")
    g.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="usage gives prompt_tokens_details.cached_tokens: the prompt tokens "
                        "the prefix cache held (vLLM's flag)")
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (a file, or the template itself) instead of "
                        "the model's")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="let a chat request bring its own chat_template (refused otherwise)")
    g.add_argument("--response-role", default="assistant",
                   help="the role of a chat reply (when add_generation_prompt is true)")
    g.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprobs name their tokens 'token_id:<id>' unless a request says "
                        "otherwise")
    g.add_argument("--generation-config", default="auto",
                   help="auto: sampling defaults (temperature, top_p, top_k, min_p, "
                        "repetition_penalty, max_new_tokens) from the model's "
                        "generation_config.json for the fields a request leaves unset; vllm: "
                        "none; or a folder holding a generation_config.json")
    logs = g.add_mutually_exclusive_group()
    logs.add_argument("--enable-log-requests", action="store_true",
                      help="log each request (id, prompt tokens, sampling parameters) at INFO")
    logs.add_argument("--disable-log-requests", action="store_true",
                      help="do not log requests (the default; vLLM's older flag)")
    g.add_argument("--uvicorn-log-level", "--log-level", dest="uvicorn_log_level",
                   default="warning",
                   choices=("critical", "error", "warning", "info", "debug", "trace"),
                   help="uvicorn's log level (--log-level is the same flag)")
    g.add_argument("--root-path", default="",
                   help="the path prefix a proxy serves the app under (FastAPI's root_path)")
    g.add_argument("--allowed-origins", type=_json_list, default=["*"],
                   help="CORS: allowed origins, a JSON list")
    g.add_argument("--allowed-methods", type=_json_list, default=["*"],
                   help="CORS: allowed methods, a JSON list")
    g.add_argument("--allowed-headers", type=_json_list, default=["*"],
                   help="CORS: allowed headers, a JSON list")
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    g.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key")
    g.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate")
    g.add_argument("--ssl-ca-certs", default=None,
                   help="CA certificates to check client certificates with")
    g.add_argument("--ssl-cert-reqs", type=int, default=0,
                   help="client certificates: 0 none, 1 optional, 2 required (Python's "
                        "ssl.CERT_*)")


def freeze_heap() -> None:
    """Move everything allocated so far (torch, the web framework, the tokenizer) out of the
    garbage collector's sight, as vLLM's server does once it is up: they are never garbage,
    and a full collection would walk all of them again, a pause on the streaming path. (The
    young generations' collections, which freezing does not change, go on as before.)"""
    import gc

    gc.collect()
    gc.freeze()


def served_name(model: str) -> str:
    """A model directory's name (never its path: clients see it), or the preset's name."""
    return model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or model


def server_settings(args, model_dir: str | None) -> ServerSettings:
    """The HTTP side's settings from the flags (a bad one raises ValueError naming it)."""
    from ..sampling_params import SamplingParams

    defaults = generation_defaults(args.generation_config, model_dir)
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--generation-config: the model's generation_config.json has a value "
                         f"nanorun refuses ({e}); pass --generation-config vllm") from None
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    return ServerSettings(
        served_model_names=tuple(args.served_model_name or [served_name(args.model)]),
        api_keys=api_keys(args.api_key), force_include_usage=args.enable_force_include_usage,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        chat_template=load_chat_template(args.chat_template),
        trust_request_chat_template=args.trust_request_chat_template,
        response_role=args.response_role,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        enable_log_requests=args.enable_log_requests, generation_defaults=defaults)


def run(args) -> int:
    if args.max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    if args.stream_interval < 1:
        raise ValueError(f"--stream-interval must be >= 1, got {args.stream_interval}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    engine_kwargs = dict(options.engine_kwargs(args, absent=SERVE_ABSENT),
                         tokenizer=args.tokenizer, revision=args.revision)
    if args.tensor_parallel_size > 1 and int(os.environ.get("RANK", "0")) > 0:
        # No HTTP here: this rank steps on the commands rank 0's engine broadcasts.
        from .engine_core import follower_main

        return follower_main(args.model, engine_kwargs)
    try:
        import uvicorn

        from .api import build_app
    except ImportError as e:
        raise RuntimeError(f"nanorun serve needs the [serve] extra ({e.name} is missing): "
                           f"pip install -e '.[serve]'") from None
    from ..models.hub import model_path
    from ..text_engine import tokenizer_of
    from .api import Cors
    from .async_engine import AsyncEngine

    model_dir = model_path(args.model, args.revision)
    settings = server_settings(args, model_dir if os.path.isdir(model_dir) else None)
    # The engine steps in a process of its own (engine_core says why); the tokenizer is
    # loaded here too, to turn prompts into ids before anything is queued.
    engine, info = AsyncEngine.spawn(args.model, engine_kwargs,
                                     max_queued_requests=args.max_queued_requests)
    tokenizer = tokenizer_of(args.tokenizer or model_dir)[0]
    app = build_app(engine, settings, tokenizer=tokenizer, max_model_len=info["max_model_len"],
                    vocab_size=info.get("vocab_size", len(tokenizer or ())),
                    stream_interval=args.stream_interval,
                    cache_info=cache_config_info(info), root_path=args.root_path,
                    cors=Cors(tuple(args.allowed_origins), tuple(args.allowed_methods),
                              tuple(args.allowed_headers), args.allow_credentials))
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
        timeout_graceful_shutdown=args.shutdown_timeout, root_path=args.root_path,
        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs))
    engine.on_dead = lambda error: _exit_soon(server, error)
    freeze_heap()
    name = settings.model_name
    log_engine(info, name)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"nanorun serve: {args.model} as {name!r} on {scheme}://{args.host}:{args.port}"
          f"{args.root_path}", file=sys.stderr, flush=True)
    try:
        server.run()
    except KeyboardInterrupt:       # uvicorn raises a Ctrl-C again once it has shut down
        pass
    finally:
        engine.shutdown()
    if engine.error is not None:
        return EXIT_ENGINE_DEAD
    return 0 if server.started else EXIT_STARTUP_FAILURE


def _exit_soon(server, error: BaseException) -> None:
    """The engine died (on the event loop): answer 503 for ENGINE_DEAD_EXIT_S, then exit."""
    import asyncio

    logger.error("%s; the server exits in %.0f s", error, ENGINE_DEAD_EXIT_S)
    asyncio.get_running_loop().call_later(ENGINE_DEAD_EXIT_S, setattr, server,
                                          "should_exit", True)


def cache_config_info(info: dict) -> dict:
    """vllm:cache_config_info's labels (vLLM's names) from the engine's "ready" info."""
    if "page_size" not in info:
        return {}
    return {"block_size": info["page_size"], "num_gpu_blocks": info["kv_pages"],
            "kv_cache_size_tokens": info["kv_tokens"], "cache_dtype": info["dtype"],
            "enable_prefix_caching": info.get("prefix_caching", False)}


def log_engine(info: dict, served_model_name: str) -> None:
    """What the engine was built with (the engine process's "ready" info), as vLLM logs at
    start: shown with `nanorun -v serve`."""
    if "model" not in info:
        return
    logger.info("engine: model=%s, served_model_name=%s, dtype=%s, device=%s, "
                "tensor_parallel_size=%d, async_scheduling=%s",
                info["model"], served_model_name, info["dtype"], info["device"],
                info["tensor_parallel_size"], info["async_scheduling"])
    logger.info("engine: layout=%s, max_batch_tokens=%d (dense batch tokens per iteration), "
                "max_num_seqs=%s", info["layout"], info["max_batch_tokens"],
                info["max_num_seqs"])
    logger.info("engine: KV cache of %d pages x %d tokens = %d tokens; max_model_len=%d "
                "(model context %d)", info["kv_pages"], info["page_size"], info["kv_tokens"],
                info["max_model_len"], info["model_context"])
