"""OpenAI's request bodies in, SamplingParams and response JSON out.

The bodies are pydantic models for their shape only (which fields, a prompt is a string or
ids); the sampling values pass through untouched to SamplingParams, which checks every one and
names the field it refuses, so the server and the Python API accept and refuse the same
values. Fields nanorun cannot honour are refused with a 400 naming them, never ignored
silently; fields that change nothing here (user, metadata) are accepted.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..sampling_params import SamplingParams

# Request fields passed to SamplingParams under the same name (OpenAI's and vLLM's extras).
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                   "stop_token_ids", "ignore_eos", "min_tokens", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "skip_special_tokens",
                   "include_stop_str_in_output", "prompt_logprobs")


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    """Fields both endpoints share. Sampling values are Any: SamplingParams checks them."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: Any = None
    n: Any = None
    temperature: Any = None
    top_p: Any = None
    top_k: Any = None
    min_p: Any = None
    seed: Any = None
    stop: Any = None
    stop_token_ids: Any = None
    ignore_eos: Any = None
    min_tokens: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    skip_special_tokens: Any = None
    include_stop_str_in_output: Any = None
    prompt_logprobs: Any = None
    user: str | None = None


class CompletionRequest(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: Any = None           # int: top-k per token
    echo: bool = False
    suffix: str | None = None
    best_of: Any = None


class ChatCompletionRequest(_Body):
    messages: list[dict[str, Any]]
    max_completion_tokens: Any = None
    logprobs: bool = False
    top_logprobs: Any = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True


def include_usage(body: _Body) -> bool:
    """stream_options.include_usage (only meaningful with stream: true)."""
    return bool(body.stream_options and body.stream_options.get("include_usage"))


def check_unsupported(body: _Body) -> None:
    """Refuse, naming it, a field nanorun would otherwise have to ignore."""
    unsupported = {"logit_bias", "functions", "function_call", "guided_json", "guided_regex",
                   "guided_choice", "guided_grammar", "use_beam_search",
                   "length_penalty"}
    extra = set(body.model_extra or {}) & unsupported
    if extra:
        name = sorted(extra)[0]
        raise BadRequest(f"{name} is not supported by nanorun", name)
    if body.stream_options is not None and not body.stream:
        raise BadRequest("stream_options is only allowed with stream: true", "stream_options")
    if body.prompt_logprobs is not None and body.stream:
        raise BadRequest("prompt_logprobs is only returned without stream: true",
                         "prompt_logprobs")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise BadRequest("echo is not supported by nanorun", "echo")
        if body.suffix:
            raise BadRequest("suffix is not supported by nanorun", "suffix")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise BadRequest("best_of other than n is not supported by nanorun", "best_of")
    if isinstance(body, ChatCompletionRequest):
        if body.tools and body.tool_choice != "none":
            raise BadRequest("tools (function calling) are not supported by nanorun", "tools")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise BadRequest("response_format other than text is not supported by nanorun",
                             "response_format")


def sampling_params(body: _Body, max_tokens: int) -> SamplingParams:
    """The request's SamplingParams; SamplingParams' own TypeError/ValueError become a
    BadRequest naming the field."""
    kwargs = {name: getattr(body, name) for name in SAMPLING_FIELDS
              if getattr(body, name) is not None}
    if isinstance(kwargs.get("stop"), list):
        kwargs["stop"] = tuple(kwargs["stop"])
    logprobs = _logprobs_k(body)
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    try:
        return SamplingParams(max_tokens=max_tokens, **kwargs)
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e), _field_named(str(e), ("max_tokens", *kwargs))) from None


def requested_max_tokens(body: _Body) -> Any:
    """max_completion_tokens (chat, OpenAI's current name) wins over max_tokens."""
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        return body.max_completion_tokens
    return body.max_tokens


def _logprobs_k(body: _Body) -> Any:
    """Top-k logprobs per token as SamplingParams.logprobs takes it, or None for none."""
    if isinstance(body, ChatCompletionRequest):
        if not body.logprobs:
            if body.top_logprobs:
                raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
            return None
        return body.top_logprobs if body.top_logprobs is not None else 0
    return body.logprobs


def _field_named(message: str, fields: Sequence[str]) -> str | None:
    """The field an error message is about: the first named at its start."""
    for name in sorted(fields, key=len, reverse=True):
        if message.startswith(name):
            return name
    return None


def error_body(message: str, kind: str = "BadRequestError", param: str | None = None,
               code: int | str | None = 400) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- logprobs -------------------------------------------------------------------------------
def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict] | None,
                        decode, top_k: int, text_offset: int) -> dict | None:
    """The legacy completions logprobs object for these tokens; text_offset where they start."""
    if logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, per_token in zip(token_ids, logprobs):
        text = _token_text(tid, per_token, decode)
        tokens.append(text)
        token_lps.append(_lp(per_token, tid))
        tops.append({_token_text(t, per_token, decode): lp.logprob
                     for t, lp in _top(per_token, top_k)})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict] | None, decode,
                  top_k: int) -> dict | None:
    """The chat logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if logprobs is None:
        return None
    content = []
    for tid, per_token in zip(token_ids, logprobs):
        text = _token_text(tid, per_token, decode)
        top = [{"token": (t_text := _token_text(t, per_token, decode)), "logprob": lp.logprob,
                "bytes": list(t_text.encode())} for t, lp in _top(per_token, top_k)]
        content.append({"token": text, "logprob": _lp(per_token, tid),
                        "bytes": list(text.encode()), "top_logprobs": top})
    return {"content": content}


def prompt_logprobs_json(prompt_logprobs: Sequence[dict | None] | None) -> list | None:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} (JSON keys are strings)."""
    if prompt_logprobs is None:
        return None
    return [None if d is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                              "decoded_token": lp.decoded_token}
                                    for t, lp in d.items()} for d in prompt_logprobs]


def _top(per_token: dict, k: int) -> list:
    """The k best entries by rank; the sampled token is also in the dict when it ranks below
    them (vLLM's shape), and is cut here."""
    return sorted(per_token.items(), key=lambda kv: kv[1].rank)[:k]


def _lp(per_token: dict, token_id: int) -> float | None:
    lp = per_token.get(token_id)
    return None if lp is None else lp.logprob


def _token_text(token_id: int, per_token: dict, decode) -> str:
    lp = per_token.get(token_id)
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return decode(token_id)
