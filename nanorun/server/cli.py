"""`nanorun serve MODEL`: the OpenAI-compatible server.

FastAPI, uvicorn, sse-starlette and prometheus_client are imported inside the command only,
so `nanorun --help` and `import nanorun` work where the [serve] extra is not installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import options
from ..options import add_engine_arguments

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
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: MODEL's "
                        "directory name)")
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
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    p.set_defaults(func=run)


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
    from .async_engine import AsyncEngine

    # The engine steps in a process of its own (engine_core says why); the tokenizer is
    # loaded here too, to turn prompts into ids before anything is queued.
    engine, info = AsyncEngine.spawn(args.model, engine_kwargs,
                                     max_queued_requests=args.max_queued_requests)
    name = args.served_model_name or served_name(args.model)
    tokenizer = tokenizer_of(args.tokenizer or model_path(args.model, args.revision))[0]
    app = build_app(engine, model_name=name, tokenizer=tokenizer,
                    max_model_len=info["max_model_len"], stream_interval=args.stream_interval)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout))
    engine.on_dead = lambda error: _exit_soon(server, error)
    freeze_heap()
    log_engine(info, name)
    print(f"nanorun serve: {args.model} as {name!r} on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
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


def log_engine(info: dict, served_model_name: str) -> None:
    """What the engine was built with (the engine process's "ready" info), as vLLM logs at
    start: shown with `nanorun -v serve`."""
    if "model" not in info:
        return
    logger.info("engine: model=%s, served_model_name=%s, dtype=%s, device=%s, "
                "tensor_parallel_size=%d, async_scheduling=%s",
                info["model"], served_model_name, info["dtype"], info["device"],
                info["tensor_parallel_size"], info["async_scheduling"])
    logger.info("engine: layout=%s, max_batch_tokens=%d (dense batch tokens per iteration)",
                info["layout"], info["max_batch_tokens"])
    logger.info("engine: KV cache of %d pages x %d tokens = %d tokens; max_model_len=%d "
                "(model context %d)", info["kv_pages"], info["page_size"], info["kv_tokens"],
                info["max_model_len"], info["model_context"])
