"""OpenAI's request bodies in, SamplingParams and response JSON out.

The bodies are pydantic models for their shape only (which fields, a prompt is a string or
ids); the sampling values pass through untouched to SamplingParams, which checks every one and
names the field it refuses, so the server and the Python API accept and refuse the same
values.

No field is ignored silently. A body with a field the models do not declare is a 400 naming
it (extra="forbid"), and every declared field says, in its annotation, what happens to it:
Sampling (passed to SamplingParams under its name), Served (the server acts on it itself), or
Refused (nanorun does not do it yet: any value but one that asks for nothing is a 400 naming
it). A field nanorun learns to do moves from Refused to Sampling or Served.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict

from ..sampling_params import SamplingParams, StructuredOutputsParams


@dataclass(frozen=True)
class Sampling:
    """A field passed to SamplingParams under its own name (which checks the value)."""


@dataclass(frozen=True)
class Served:
    """A field the server acts on itself: `how`."""

    how: str


@dataclass(frozen=True)
class Refused:
    """A field nanorun does not act on: any value but those in `noop` (they ask for nothing
    it does not do) is refused with a 400 naming the field. `example`: a value a client sends
    to ask for it."""

    why: str
    example: Any
    noop: tuple = (None,)


SAMPLING = Sampling()
_GUIDED = "vLLM's older name: becomes the matching structured_outputs field"
# vLLM's older request fields and the structured_outputs field each becomes.
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar", "structural_tag": "structural_tag"}
# The grammar backends a request may name: nanorun has one, xgrammar ("auto" picks it).
_BACKENDS = ("xgrammar", "auto")
_NO_TOOLS = "nanorun does not parse tool calls"


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None
    # vLLM's: with include_usage, every chunk carries the usage so far (its choice's tokens).
    continuous_usage_stats: bool | None = None


class _Body(BaseModel):
    """Fields both endpoints share. Sampling values are Any: SamplingParams checks them."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str | None, Served("checked against the served model's name")] = None
    stream: Annotated[bool, Served("server-sent events")] = False
    stream_options: Annotated[StreamOptions | None, Served(
        "include_usage: a last chunk with the usage; continuous_usage_stats: every chunk's "
        "usage so far")] = None
    max_tokens: Annotated[Any, Served("SamplingParams.max_tokens, defaulted per endpoint")] \
        = None
    n: Annotated[Any, SAMPLING] = None
    temperature: Annotated[Any, SAMPLING] = None
    top_p: Annotated[Any, SAMPLING] = None
    top_k: Annotated[Any, SAMPLING] = None
    min_p: Annotated[Any, SAMPLING] = None
    seed: Annotated[Any, SAMPLING] = None
    stop: Annotated[Any, SAMPLING] = None
    stop_token_ids: Annotated[Any, SAMPLING] = None
    ignore_eos: Annotated[Any, SAMPLING] = None
    min_tokens: Annotated[Any, SAMPLING] = None
    presence_penalty: Annotated[Any, SAMPLING] = None
    frequency_penalty: Annotated[Any, SAMPLING] = None
    repetition_penalty: Annotated[Any, SAMPLING] = None
    skip_special_tokens: Annotated[Any, SAMPLING] = None
    include_stop_str_in_output: Annotated[Any, SAMPLING] = None
    prompt_logprobs: Annotated[Any, SAMPLING] = None
    truncate_prompt_tokens: Annotated[Any, Served(
        "the prompt's last N tokens are kept (-1: max_model_len), as vLLM truncates")] = None
    spaces_between_special_tokens: Annotated[Any, SAMPLING] = None
    cache_salt: Annotated[Any, Served(
        "checked as vLLM does (a string of 1 to 1024 characters); keys the prefix cache")] \
        = None
    return_tokens_as_token_ids: Annotated[Any, Served(
        "logprobs' tokens as 'token_id:<id>' strings")] = None
    return_token_ids: Annotated[Any, Served(
        "prompt_token_ids and each choice's token_ids in the response")] = None
    priority: Annotated[Any, Refused(
        "nanorun's scheduling policies (fcfs, hrrn) have no priorities, and vLLM too refuses a "
        "priority other than 0 unless its scheduling policy is 'priority'", 1, (None, 0))] = None
    user: Annotated[str | None, Served("nothing to do: OpenAI's end-user id for its abuse "
                                       "monitoring (vLLM ignores it too)")] = None

    logit_bias: Annotated[Any, SAMPLING] = None
    allowed_token_ids: Annotated[Any, SAMPLING] = None
    bad_words: Annotated[Any, SAMPLING] = None
    structured_outputs: Annotated[Any, SAMPLING] = None
    response_format: Annotated[Any, Served(
        "json_object, json_schema (its json_schema.schema) and structural_tag become "
        "structured_outputs, as vLLM maps them; text asks for nothing")] = None
    guided_json: Annotated[Any, Served(_GUIDED)] = None
    guided_regex: Annotated[Any, Served(_GUIDED)] = None
    guided_choice: Annotated[Any, Served(_GUIDED)] = None
    guided_grammar: Annotated[Any, Served(_GUIDED)] = None
    structural_tag: Annotated[Any, Served(_GUIDED)] = None
    guided_decoding_backend: Annotated[Any, Served(
        "'xgrammar' or 'auto' (nanorun's one grammar engine); another backend is a 400")] \
        = None
    guided_whitespace_pattern: Annotated[Any, Refused(
        "xgrammar has no whitespace pattern (structured_outputs.disable_any_whitespace "
        "gives compact JSON)", r"[ ]?")] = None
    use_beam_search: Annotated[Any, Refused("beam search is not supported", True,
                                            (None, False))] = None
    length_penalty: Annotated[Any, Refused("beam search is not supported", 0.5,
                                           (None, 1.0))] = None
    logits_processors: Annotated[Any, Refused("logits processors are not supported",
                                              ["my.Processor"], (None, []))] = None
    request_id: Annotated[Any, Refused("the server names each request itself", "mine")] = None
    kv_transfer_params: Annotated[Any, Refused("KV transfer is not served over HTTP",
                                               {"do_remote_decode": True})] = None
    vllm_xargs: Annotated[Any, Refused("vllm_xargs is not supported", {"k": 1},
                                       (None, {}))] = None


class CompletionRequest(_Body):
    prompt: Annotated[str | list[int] | list[str] | list[list[int]],
                      Served("tokenized here (or token ids as they are)")]
    logprobs: Annotated[Any, Served("SamplingParams.logprobs: top-k per token")] = None
    best_of: Annotated[Any, Served("accepted equal to n (it then changes nothing); any other "
                                   "value is refused")] = None
    echo: Annotated[Any, Served("the prompt before the output text (and its logprobs before "
                                "the output's); with max_tokens 0, the prompt alone")] = None
    suffix: Annotated[Any, Refused("suffix is not supported", "x", (None, ""))] = None
    add_special_tokens: Annotated[Any, Served(
        "text prompts are encoded with the tokenizer's special tokens (BOS) unless false")] \
        = None
    prompt_embeds: Annotated[Any, Refused("prompt_embeds is not supported", "AAAA")] = None


class ChatCompletionRequest(_Body):
    messages: Annotated[list[dict[str, Any]], Served("rendered by the chat template")]
    max_completion_tokens: Annotated[Any, Served("wins over max_tokens")] = None
    logprobs: Annotated[bool, Served("SamplingParams.logprobs, with top_logprobs")] = False
    top_logprobs: Annotated[Any, Served("SamplingParams.logprobs")] = None
    tools: Annotated[list[Any] | None, Served(f"given to the chat template with tool_choice "
                                              f"'none'; otherwise refused: {_NO_TOOLS}")] = None
    tool_choice: Annotated[Any, Served("'none' (or no tools) only")] = None
    add_generation_prompt: Annotated[bool, Served("given to the chat template")] = True
    continue_final_message: Annotated[bool, Served(
        "the final message is left open for the model to continue (not with "
        "add_generation_prompt)")] = False
    echo: Annotated[bool, Served("the last message's content before the reply, when its role "
                                 "is the reply's")] = False
    add_special_tokens: Annotated[bool, Served(
        "the rendered chat is encoded with the tokenizer's special tokens too (default false: "
        "the template writes them)")] = False
    chat_template: Annotated[str | None, Served(
        "renders this request (with --trust-request-chat-template, as vLLM)")] = None
    chat_template_kwargs: Annotated[dict[str, Any] | None, Served(
        "extra variables for the chat template")] = None
    documents: Annotated[Any, Refused("documents are not supported",
                                      [{"title": "a", "text": "b"}])] = None
    functions: Annotated[Any, Refused(_NO_TOOLS, [{"name": "f"}], (None, []))] = None
    function_call: Annotated[Any, Refused(_NO_TOOLS, "auto", (None, "none"))] = None
    parallel_tool_calls: Annotated[Any, Refused(_NO_TOOLS, True)] = None
    reasoning_effort: Annotated[Any, Refused("there is no reasoning control", "low")] = None
    modalities: Annotated[Any, Refused("text is the only modality", ["audio"],
                                       (None, ["text"]))] = None
    audio: Annotated[Any, Refused("text is the only modality", {"voice": "alloy"})] = None
    prediction: Annotated[Any, Refused("predicted outputs are not supported",
                                       {"type": "content", "content": "x"})] = None
    store: Annotated[Any, Refused("completions are not stored", True, (None, False))] = None
    metadata: Annotated[Any, Refused("completions are not stored (metadata is for stored "
                                     "ones)", {"k": "v"}, (None, {}))] = None
    service_tier: Annotated[Any, Refused("there are no service tiers", "flex",
                                         (None, "auto", "default"))] = None
    web_search_options: Annotated[Any, Refused("there is no web search", {})] = None


class TokenizeRequest(BaseModel):
    """/tokenize: vLLM's two bodies in one, a completion's `prompt` or a chat's `messages`
    (exactly one of them; the chat fields only with messages)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None      # vLLM's default: true for prompt, false chat
    return_token_strs: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


Disposition = Sampling | Served | Refused


@functools.cache
def field_dispositions(model: type[BaseModel]) -> dict[str, Disposition]:
    """Each declared field of a request model and what happens to it (its annotation's
    Sampling, Served or Refused; a field with none, or two, is a bug the tests catch)."""
    out = {}
    for name, info in model.model_fields.items():
        marks = [m for m in info.metadata if isinstance(m, (Sampling, Served, Refused))]
        if len(marks) != 1:
            raise TypeError(f"{model.__name__}.{name} must say once what happens to it "
                            f"(Sampling, Served or Refused), got {marks}")
        out[name] = marks[0]
    return out


def include_usage(body: _Body, force: bool = False) -> tuple[bool, bool]:
    """(a last chunk with the usage, every chunk with the usage so far) for a stream, as vLLM
    decides them: stream_options.include_usage, or `force` (--enable-force-include-usage);
    continuous_usage_stats only with the first."""
    options = body.stream_options
    usage = force or bool(options and options.include_usage)
    return usage, usage and bool(options and options.continuous_usage_stats)


def check_unsupported(body: _Body) -> None:
    """Refuse, naming it, a field nanorun would otherwise have to ignore."""
    for name, what in field_dispositions(type(body)).items():
        if isinstance(what, Refused) and getattr(body, name) not in what.noop:
            raise BadRequest(f"{name} is not supported by nanorun: {what.why}", name)
    if body.stream_options is not None and not body.stream:
        raise BadRequest("stream_options is only allowed with stream: true", "stream_options")
    if body.prompt_logprobs is not None and body.stream:
        raise BadRequest("prompt_logprobs is only returned without stream: true",
                         "prompt_logprobs")
    for name in ("return_token_ids", "return_tokens_as_token_ids"):
        if getattr(body, name) not in (None, True, False):
            raise BadRequest(f"{name} must be true or false", name)
    salt = body.cache_salt
    if salt is not None and (not isinstance(salt, str) or not 1 <= len(salt) <= 1024):
        raise BadRequest("cache_salt must be a non-empty string of at most 1024 characters",
                         "cache_salt")
    k = body.truncate_prompt_tokens
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k == 0 or k < -1):
        raise BadRequest(f"truncate_prompt_tokens must be an integer >= 1 or -1, got {k!r}",
                         "truncate_prompt_tokens")
    if isinstance(body, CompletionRequest):
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise BadRequest("best_of other than n is not supported by nanorun", "best_of")
        for name in ("echo", "add_special_tokens"):
            if getattr(body, name) not in (None, True, False):
                raise BadRequest(f"{name} must be true or false", name)
    if isinstance(body, ChatCompletionRequest):
        if body.continue_final_message and body.add_generation_prompt:
            raise BadRequest("continue_final_message and add_generation_prompt cannot both be "
                             "true: send add_generation_prompt: false to continue the final "
                             "message", "continue_final_message")
        if body.tools and body.tool_choice != "none":
            raise BadRequest(f"tools (function calling) are not supported by nanorun: "
                             f"{_NO_TOOLS} (tool_choice 'none' is)", "tools")
        if body.tool_choice not in (None, "none"):
            raise BadRequest(f"tool_choice other than 'none' is not supported: {_NO_TOOLS}",
                             "tool_choice")


def sampling_params(body: _Body, max_tokens: int, *,
                    defaults: dict[str, Any] | None = None) -> SamplingParams:
    """The request's SamplingParams; SamplingParams' own TypeError/ValueError become a
    BadRequest naming the field. defaults: values for the Sampling fields the body leaves
    unset (--generation-config). logprobs and prompt_logprobs -1 mean the whole vocabulary,
    as in vLLM (the engine bounds them by its max_logprobs); completions' echo asks for the
    prompt's logprobs with the output's."""
    kwargs = {name: getattr(body, name) for name, what in field_dispositions(type(body)).items()
              if isinstance(what, Sampling) and getattr(body, name) is not None}
    for name, value in (defaults or {}).items():
        kwargs.setdefault(name, value)
    if isinstance(kwargs.get("stop"), list):
        kwargs["stop"] = tuple(kwargs["stop"])
    logprobs = _whole_vocab(_logprobs_k(body), "top_logprobs" if isinstance(
        body, ChatCompletionRequest) else "logprobs")
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    prompt_logprobs = _whole_vocab(body.prompt_logprobs, "prompt_logprobs")
    if prompt_logprobs is None and isinstance(body, CompletionRequest) and body.echo:
        prompt_logprobs = logprobs
    if prompt_logprobs is not None:
        kwargs["prompt_logprobs"] = prompt_logprobs
    structured = structured_outputs(body)
    if structured is not None:
        kwargs["structured_outputs"] = structured
    try:
        return SamplingParams(max_tokens=max_tokens, **kwargs)
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e), _field_named(str(e), ("max_tokens", *kwargs))) from None


def structured_outputs(body: _Body) -> StructuredOutputsParams | None:
    """The request's structured output from whichever of vLLM's three ways it uses: the
    structured_outputs object, the older guided_* fields (and structural_tag), or
    response_format. Two of them at once, or a malformed one, is a 400 naming the field."""
    asked = []
    if body.structured_outputs is not None:
        asked.append(("structured_outputs", body.structured_outputs))
    guided = [name for name in _GUIDED_FIELDS if getattr(body, name) is not None]
    if len(guided) > 1:
        raise BadRequest(f"{guided[1]} and {guided[0]} both ask for a structured output; "
                         f"give one", guided[1])
    if guided:
        asked.append((guided[0], {_GUIDED_FIELDS[guided[0]]: getattr(body, guided[0])}))
    response = _response_format(body.response_format)
    if response is not None:
        asked.append(("response_format", response))
    backend = body.guided_decoding_backend
    if backend is not None and backend not in _BACKENDS:
        raise BadRequest(f"guided_decoding_backend {backend!r} is not nanorun's: its grammar "
                         f"engine is xgrammar (give 'xgrammar' or 'auto', or leave it out)",
                         "guided_decoding_backend")
    if len(asked) > 1:
        raise BadRequest(f"{asked[1][0]} and {asked[0][0]} both ask for a structured output; "
                         f"give one", asked[1][0])
    if not asked:
        return None
    field, value = asked[0]
    try:
        return StructuredOutputsParams.of(value)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"{field}: {e}" if field != "structured_outputs" else str(e),
                         field) from None


def _response_format(value: Any) -> dict | None:
    """OpenAI's response_format as structured_outputs fields (None: text, or none given)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or spec.get("schema") is None:
            raise BadRequest("response_format json_schema needs json_schema.schema (the JSON "
                             "schema the output follows)", "response_format")
        return {"json": spec["schema"]}
    if kind == "structural_tag":      # vLLM passes the whole object on as its JSON
        return {"structural_tag": json.dumps(value)}
    raise BadRequest(f"response_format type must be text, json_object, json_schema or "
                     f"structural_tag, got {kind!r}", "response_format")


def requested_max_tokens(body: _Body) -> Any:
    """max_completion_tokens (chat, OpenAI's current name) wins over max_tokens."""
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        return body.max_completion_tokens
    return body.max_tokens


def _whole_vocab(k: Any, name: str) -> Any:
    """k, where -1 is vLLM's "every token" (which the engine bounds by its max_logprobs);
    other negatives are a 400 naming the field."""
    if isinstance(k, int) and not isinstance(k, bool) and k < -1:
        raise BadRequest(f"{name} must be a positive value or -1 (the whole vocabulary), got "
                         f"{k}", name)
    return k


def echo_only(body: _Body) -> bool:
    """completions' echo with max_tokens 0: the prompt alone (one token is generated and left
    out, as vLLM does)."""
    return isinstance(body, CompletionRequest) and bool(body.echo) and body.max_tokens == 0


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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """The usage object; cached_tokens (the prompt tokens the prefix cache held) goes in
    prompt_tokens_details when there are some, as vLLM gives it with
    --enable-prompt-tokens-details (None: not asked for)."""
    body = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


# -- logprobs -------------------------------------------------------------------------------
def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict | None] | None,
                        decode, top_k: int, text_offset: int,
                        as_ids: bool = False) -> dict | None:
    """The legacy completions logprobs object for these tokens; text_offset where they start.
    Each top_logprobs entry holds the sampled token and the top_k best (so up to top_k + 1
    entries, one with top_k 0), as OpenAI and vLLM return them. An entry of None (an echoed
    prompt's first token, which has no logprob) is null there, as in vLLM. as_ids: tokens as
    'token_id:<id>' (return_tokens_as_token_ids)."""
    if logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, per_token in zip(token_ids, logprobs):
        text = _token_text(tid, per_token or {}, decode, as_ids)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if per_token is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(_lp(per_token, tid))
        top = {} if tid not in per_token else {text: per_token[tid].logprob}
        top.update((_token_text(t, per_token, decode, as_ids), lp.logprob)
                   for t, lp in _top(per_token, top_k))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict] | None, decode,
                  top_k: int, as_ids: bool = False) -> dict | None:
    """The chat logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if logprobs is None:
        return None
    content = []
    for tid, per_token in zip(token_ids, logprobs):
        text = _token_text(tid, per_token, decode, as_ids)
        top = [{"token": (t_text := _token_text(t, per_token, decode, as_ids)),
                "logprob": lp.logprob, "bytes": list(t_text.encode())}
               for t, lp in _top(per_token, top_k)]
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


def _token_text(token_id: int, per_token: dict, decode, as_ids: bool = False) -> str:
    if as_ids:
        return f"token_id:{token_id}"
    lp = per_token.get(token_id)
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return decode(token_id)
