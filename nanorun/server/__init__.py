"""`nanorun serve`: an OpenAI-compatible HTTP server over a TextEngine.

    async_engine   one thread steps the TextEngine; handlers add requests and await their outputs
    protocol       OpenAI request bodies -> prompts and SamplingParams, outputs -> response JSON
    metrics        Prometheus metrics under vLLM's names
    api            the FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health,
                   /metrics
    cli            the `serve` subcommand

Nothing here is imported by `import nanorun`: FastAPI, uvicorn, sse-starlette and
prometheus_client are the [serve] extra, imported only when a server is built.
"""
