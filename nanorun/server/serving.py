"""Serving one request: its prompts -> engine requests (SamplingParams over the server's
defaults, one request per prompt, all or none queued), then its answer once all have
finished, or a stream of every step's new text as server-sent events.

A client that goes away mid-stream cancels its generator, and closing it aborts its
requests; a non-streaming client that goes away is noticed by a watcher that polls the
connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from .async_engine import RequestStream
from .prompts import Prompt
from .protocol import BadRequest, echo_only, new_id, requested_max_tokens, sampling_params
from .responses import ChunkWriter
from .state import ServerState
from .streaming import EventStream

DEFAULT_COMPLETION_MAX_TOKENS = 16      # OpenAI's (and vLLM's) default for /v1/completions
_DISCONNECT_POLL_S = 0.25

logger = logging.getLogger("nanorun.server")


async def serve(state: ServerState, body, raw: Request, prompts: list[Prompt], *,
                chat: bool) -> Response:
    """Queue every prompt, then stream or answer once all have finished."""
    params = _sampling_params(state, body, prompts, chat)
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
    writer = ChunkWriter(state, body, request_id, chat, prompts)
    if body.stream:
        return EventStream(writer.events(streams), streams)
    try:
        finals = await _collect(streams, raw)
    finally:
        for s in streams:
            s.abort()
    if finals is None:
        return Response(status_code=499)          # the client is gone; nobody reads this
    return writer.response(finals)


def _sampling_params(state: ServerState, body, prompts: list[Prompt], chat: bool) -> list:
    """Each prompt's SamplingParams: the body's, over the server's generation defaults."""
    defaults = dict(state.settings.generation_defaults)
    default_max = defaults.pop("max_tokens", None)
    return [sampling_params(body, 1 if echo_only(body) else
                            _max_tokens(state, body, len(p.ids), chat, default_max),
                            defaults=defaults)
            for p in prompts]


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
