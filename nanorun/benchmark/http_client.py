"""`nanorun bench --base-url`: the same traces and arrivals, over HTTP, against any server.

Drives a running OpenAI-compatible server (nanorun's, vLLM's, SGLang's, ...) the way `vllm bench
serve` does: every request is a streaming POST /v1/completions with aiohttp, its prompt the same
seeded token ids the in-process runner uses (Workload), greedy, `ignore_eos` and `max_tokens` at
the trace's output length, `stream_options.include_usage` for the token count. Each request is
sent at its scheduled arrival time (seconds after the start), and that time is its arrival, as
in the in-process runner, so a late client counts against the server, never for it.

The client runs on uvloop where it is installed (run_client), as the server does.

Per request: TTFT = first chunk that carries output - arrival; ITL = the gaps between such
chunks (a chunk is one engine step's new tokens on nanorun and vLLM); E2EL = the stream's end -
arrival; the output length is usage.completion_tokens. A request fails (with the reason) on an
HTTP error, an error event in the stream, or any other output length.

aiohttp is the only dependency (the GPU machine has it, not FastAPI); it is imported inside.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import arrivals as arrival_process
from . import environment
from .metrics import RequestResult, compute_metrics
from .report import REPORT_VERSION, json_rate
from .summary import percent, prefix_lines
from .traces import LengthFilter, load_trace
from .workload import Prefixes, Workload

_ERROR_CHARS = 300


@dataclass(frozen=True)
class HttpBenchConfig:
    """One `nanorun bench --base-url` invocation. `model` (a model directory or preset) gives
    the vocabulary that prompts are drawn from and the context the trace is fitted to."""

    base_url: str
    model: str = "tiny-llama"
    served_model_name: str | None = None     # None: the first of the server's /v1/models
    trace: str = "sharegpt"
    num_requests: int | None = 32
    length_filter: LengthFilter | None = None
    request_rates: tuple[arrival_process.RequestRate, ...] = (math.inf,)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    goodput: tuple[tuple[str, float], ...] = ()
    percentiles: tuple[float, ...] = (99.0,)
    seed: int = 0
    timeout_s: float = 6 * 3600
    prefixes: Prefixes = Prefixes()         # a shared system prompt, conversations

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got "
                             f"{self.base_url!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/")


def run_http_benchmark(config: HttpBenchConfig) -> dict:
    """Every request rate in turn against the server; the report as JSON-ready values."""
    return run_client(_run(config))


def run_client(main):
    """Run the client coroutine on uvloop where it is installed (it comes with the [serve]
    extra's uvicorn[standard]), else on asyncio's own loop. uvloop costs the client less CPU
    per streamed chunk, and a client on the server's machine competes with the server for
    its cores: the less it takes, the more the figures are the server's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    if hasattr(asyncio, "Runner"):          # Python 3.11+
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return uvloop.run(main)


async def _run(config: HttpBenchConfig) -> dict:
    import aiohttp

    from ..models import resolve_model

    model_config = resolve_model(config.model)[0]
    trace = load_trace(config.trace, num_requests=config.num_requests, seed=config.seed,
                       length_filter=config.length_filter)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        served = await _served_model(session, config)
        max_len = served.get("max_model_len") or model_config.max_position_embeddings
        workload = Workload.fit_limits(trace, int(max_len), model_config.vocab_size,
                                       config.seed, f"longer than the server's max_model_len "
                                                    f"({max_len} tokens)", config.prefixes)
        schedules = [arrival_process.schedule(workload.starts(), rate,
                                              burstiness=config.burstiness, seed=config.seed)
                     for rate in config.request_rates]
        name = served["id"]
        await warm_up_http(session, config.url, name)
        runs = []
        for rate, arrivals in zip(config.request_rates, schedules):
            results, duration = await drive_http(session, config.url, name, workload,
                                                 arrivals, config.max_concurrency)
            metrics = compute_metrics(results, duration, percentiles=config.percentiles,
                                      goodput=dict(config.goodput) or None)
            runs.append(_run_dict(config, name, rate, arrivals, results, metrics))
    return {"nanorun": _header(config, model_config.name, name, workload), "runs": runs}


async def _served_model(session, config: HttpBenchConfig) -> dict:
    """The /v1/models entry to send requests to (its max_model_len, where the server says)."""
    async with session.get(f"{config.url}/v1/models") as r:
        if r.status != 200:
            raise RuntimeError(f"GET {config.url}/v1/models: HTTP {r.status}: "
                               f"{(await r.text())[:_ERROR_CHARS]}")
        models = (await r.json())["data"]
    if config.served_model_name is None:
        if not models:
            raise RuntimeError(f"{config.url} serves no model (/v1/models is empty)")
        return models[0]
    for m in models:
        if m["id"] == config.served_model_name:
            return m
    return {"id": config.served_model_name}


async def drive_http(session, url: str, model_name: str, workload: Workload,
                     arrivals: np.ndarray, max_concurrency: int | None = None
                     ) -> tuple[list[RequestResult], float]:
    """Send request i at arrivals[i] seconds over an aiohttp session; (results in trace order,
    seconds from the start to the last completion), as runner.drive does in process. With
    conversations, arrivals are their starts, and each later turn is sent its think time after
    the previous answer arrived, with the conversation so far (the answer's token ids as the
    server returned them: return_token_ids)."""
    limit = asyncio.Semaphore(max_concurrency or len(arrivals) or 1)
    start = time.perf_counter()
    trace = workload.trace
    if workload.prefixes.turns > 1:
        results = [RequestResult(int(n), 0, error="not sent: an earlier turn of its "
                                 "conversation failed") for n in trace.prompt_lens]
        await asyncio.gather(*(_conversation(session, url, model_name, workload, c,
                                             start + float(t), limit, results)
                               for c, t in enumerate(arrivals)))
        return results, time.perf_counter() - start

    async def one(i: int) -> RequestResult:
        arrival = start + float(arrivals[i])
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        async with limit:
            return await _one_request(session, url, model_name,
                                      workload.prompts[i].tolist(), int(trace.output_lens[i]),
                                      arrival)

    results = await asyncio.gather(*(one(i) for i in range(len(arrivals))))
    return list(results), time.perf_counter() - start


async def _conversation(session, url: str, model_name: str, workload: Workload, c: int,
                        arrival: float, limit: asyncio.Semaphore,
                        results: list[RequestResult]) -> None:
    """Conversation c's turns, one after the other, into results[row]; stops at a failure."""
    turns = workload.prefixes.turns
    context = list(workload.system_prompt)
    for row in range(c * turns, (c + 1) * turns):
        if row % turns:
            arrival = time.perf_counter() + float(workload.think_times[row])
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        prompt, answer = context + workload.prompts[row].tolist(), []
        async with limit:
            results[row] = await _one_request(session, url, model_name, prompt,
                                              int(workload.trace.output_lens[row]), arrival,
                                              answer=answer)
        if results[row].error:
            return
        if len(answer) != results[row].output_len:
            results[row] = _failed(prompt, f"the server returned {len(answer)} token ids for "
                                           f"{results[row].output_len} tokens: a conversation "
                                           f"needs return_token_ids (vLLM, nanorun)")
            return
        context = prompt + answer


async def warm_up_http(session, url: str, model_name: str) -> None:
    """One short request, so the server's first-request costs are not timed."""
    result = await _one_request(session, url, model_name, [1, 2, 3], 2, time.perf_counter())
    if result.error:
        raise RuntimeError(f"the warm-up request to {url} failed: {result.error}")


async def _one_request(session, url: str, model_name: str, prompt: list[int], max_tokens: int,
                       arrival: float, *, answer: list[int] | None = None) -> RequestResult:
    """One streaming completion; latencies from `arrival` (perf_counter seconds). With
    `answer`, asks for the output's token ids (return_token_ids) and appends them there."""
    body = {"model": model_name, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if answer is not None:
        body["return_token_ids"] = True
    ttft, last, itls, produced, cached = None, arrival, [], None, None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as r:
            if r.status != 200:
                return _failed(prompt, f"HTTP {r.status}: {(await r.text())[:_ERROR_CHARS]}")
            async for now, data in _sse_events(r.content):
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return _failed(prompt, f"stream error: {chunk['error']}")
                if chunk.get("choices"):
                    if answer is not None:
                        answer.extend(chunk["choices"][0].get("token_ids") or ())
                    if ttft is None:
                        ttft = now - arrival
                    else:
                        itls.append(now - last)
                    last = now
                if chunk.get("usage"):
                    produced = chunk["usage"]["completion_tokens"]
                    details = chunk["usage"].get("prompt_tokens_details") or {}
                    cached = details.get("cached_tokens")
    except (OSError, asyncio.TimeoutError, ValueError) as e:    # aiohttp errors are OSErrors
        return _failed(prompt, f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    if produced != max_tokens:
        return RequestResult(len(prompt), produced or 0, error=(
            f"produced {produced} tokens (usage.completion_tokens), expected {max_tokens}"))
    return RequestResult(len(prompt), produced, ttft=ttft, e2el=end - arrival,
                         itls=tuple(itls), cached_tokens=cached)


async def _sse_events(content) -> AsyncIterator[tuple[float, str]]:
    """(arrival time, data) of each SSE `data:` line of an aiohttp response body. Read a block
    at a time as the bytes arrive: aiohttp's readline costs several Python calls per line,
    which on a machine shared with the server is CPU taken from the server. The lines of one
    block share its arrival time."""
    pending = b""
    async for block in content.iter_any():
        now = time.perf_counter()
        *lines, pending = (pending + block).split(b"\n")
        for line in lines:
            data = _sse_data(line)
            if data is not None:
                yield now, data
    data = _sse_data(pending)        # a last line without its newline
    if data is not None:
        yield time.perf_counter(), data


def _sse_data(line: bytes) -> str | None:
    """The data of an SSE `data:` line; None for blank lines, comments and other fields."""
    text = line.decode("utf-8").strip()
    if not text.startswith("data:"):
        return None
    return text[5:].strip()


def _failed(prompt: list[int], reason: str) -> RequestResult:
    return RequestResult(len(prompt), 0, error=reason)


def _header(config: HttpBenchConfig, model: str, served: str, workload: Workload) -> dict:
    import torch

    trace = workload.trace
    return {
        "report_version": REPORT_VERSION,
        **environment.describe(torch.device("cpu")),
        "measured_by": "http client (nanorun bench --base-url)",
        "base_url": config.url,
        "served_model": served,
        "model": model,
        "request_rates": [json_rate(r) for r in config.request_rates],
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "trace": trace.name,
        "trace_source": trace.source,
        "length_filter": str(config.length_filter) if config.length_filter else None,
        "num_requests": len(trace),
        "prefixes": config.prefixes.describe(),
        "num_conversations": workload.num_conversations,
        "num_skipped": workload.num_skipped,
        "skip_reason": workload.skip_reason or None,
        "mean_prompt_len": float(trace.prompt_lens.mean()),
        "mean_output_len": float(trace.output_lens.mean()),
        "seed": config.seed,
        "goodput_slo_ms": dict(config.goodput) or None,
    }


def _run_dict(config: HttpBenchConfig, served: str, rate, arrivals: np.ndarray,
              results: list[RequestResult], metrics: dict) -> dict:
    """One rate's result in `vllm bench serve`'s shape (per-token ITLs left out for size, as
    in the in-process report)."""
    from datetime import datetime, timezone

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": "openai",
        "model_id": served,
        "num_prompts": len(results),
        "request_rate": json_rate(rate),
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        **metrics,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_len for r in results],
        "ttfts": [r.ttft for r in results],
        "latencies": [r.e2el for r in results],
        "errors": [r.error for r in results],
        "nanorun": {"offered_rate": json_rate(arrival_process.offered_rate(arrivals))},
    }


def format_http_summary(report: dict) -> str:
    """A few lines: what was driven, and one row per request rate."""
    h = report["nanorun"]
    lines = [f"nanorun bench --base-url {h['base_url']}: model {h['served_model']}, trace "
             f"{h['trace']} ({h['num_requests']} requests, mean {h['mean_prompt_len']:.0f} "
             f"prompt / {h['mean_output_len']:.0f} output tokens)",
             *prefix_lines(h),
             f"{'rate':>6}  {'ok/fail':>8}  {'req/s':>7}  {'out tok/s':>10}  {'tot tok/s':>10}  "
             f"{'hit %':>6}  {'TTFT ms':>9}  {'TPOT ms':>8}  {'ITL ms':>7}  {'E2EL ms':>9}"]
    for r in report["runs"]:
        ok = f"{r['completed']}/{r['failed']}"
        lines.append(f"{r['request_rate']!s:>6}  {ok:>8}  {r['request_throughput']:>7.2f}  "
                     f"{r['output_throughput']:>10,.0f}  "
                     f"{r['total_token_throughput']:>10,.0f}  "
                     f"{percent(r.get('prefix_cache_hit_rate')):>6}  {_ms(r['mean_ttft_ms']):>9}  "
                     f"{_ms(r['mean_tpot_ms']):>8}  {_ms(r['mean_itl_ms']):>7}  "
                     f"{_ms(r['mean_e2el_ms']):>9}")
    failed = [e for r in report["runs"] for e in r["errors"] if e]
    if failed:
        lines.append(f"{len(failed)} failed requests; first reason: {failed[0]}")
    return "\n".join(lines)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"
