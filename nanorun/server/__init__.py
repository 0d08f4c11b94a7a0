"""`nanorun serve`: an OpenAI-compatible HTTP server over a TextEngine.

    engine_core    the engine loop, in a process of its own (and tensor-parallel ranks' loops)
    async_engine   handlers add requests to that loop and await their outputs on the event loop
    protocol       OpenAI request bodies -> prompts and SamplingParams, outputs -> response JSON
    metrics        Prometheus metrics under vLLM's names
    settings       what the server's flags tell the HTTP side (names, API keys, chat and
                   sampling defaults)
    api            the FastAPI app: /v1/completions, /v1/chat/completions, /v1/models,
                   /tokenize, /detokenize, /health, /ping, /version, /metrics; error handlers
    auth           the API-key check on /v1 routes (--api-key)
    state          ServerState, what the handlers share
    prompts        text, token ids or chat messages -> a prompt's token ids (chat template,
                   truncation)
    serving        one request: SamplingParams, engine requests, then its answer or stream
    responses      OpenAI's response JSON and stream chunks (ChunkWriter), error JSON
    streaming      server-sent events: framing, the streaming response, merging streams
    cli            the `serve` subcommand

Nothing here is imported by `import nanorun`: FastAPI, uvicorn, sse-starlette and
prometheus_client are the [serve] extra, imported only when a server is built.
"""
