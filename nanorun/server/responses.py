"""Responses: OpenAI's (and vLLM's) JSON for a request's outputs, whole or as stream chunks.

ChunkWriter builds a completions or chat completions response from the final outputs, or
every step's chunk of a stream (then `data: [DONE]`); error_response is the error JSON every
route answers with.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse

from .async_engine import EngineDeadError, RequestStream
from .prompts import Prompt
from .protocol import (ChatCompletionRequest, chat_logprobs, completion_logprobs, echo_only,
                       error_body, include_usage, now, prompt_logprobs_json, usage)
from .state import ServerState
from .streaming import merge_streams, sse_event


def error_response(status: int, message: str, kind: str,
                   param: str | None = None) -> JSONResponse:
    """OpenAI's error JSON (vLLM's ErrorResponse) with its HTTP status."""
    return JSONResponse(error_body(message, kind, param, status), status_code=status)


class ChunkWriter:
    """OpenAI's JSON for one HTTP request's outputs: the whole response, or stream chunks.

    What vLLM adds on request: echo (completions: the prompt's text, and with logprobs its
    logprobs, before the output's; chat: the last message's content before the reply when it
    has the reply's role), return_token_ids (prompt_token_ids, and each choice's token_ids;
    in a stream the prompt's with a choice's first chunk, the new ones with each),
    return_tokens_as_token_ids (logprobs' tokens as 'token_id:<id>'), and a stream's usage
    on every chunk (continuous_usage_stats)."""

    def __init__(self, state: ServerState, body, request_id: str, chat: bool,
                 prompts: Sequence[Prompt]) -> None:
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

    def _echo_text(self, body, prompt: Prompt) -> str:
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
                    return error_response(500, f"generation failed: {c.error}",
                                          "InternalServerError")
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
            async with aclosing(merge_streams(streams)) as outputs:   # its tasks end with this
                async for i, out in outputs:
                    cached[i] = out.num_cached_tokens
                    for c in out.outputs:
                        chunk = self._chunk(i, i * self.n + c.index, c, out, sent, frame)
                        if chunk is not None:
                            yield sse_event(chunk)
            if self.usage:
                produced = sum(tokens for _, tokens in sent.values())
                yield sse_event(json.dumps({**self._head(True), "choices": [],
                                         "usage": usage(self.prompt_tokens, produced,
                                                        self._cached(cached.values()))}))
        except EngineDeadError as e:
            yield sse_event(json.dumps(error_body(str(e), "ServiceUnavailableError", None, 503)))
        finally:
            for s in streams:
                s.abort()
        yield sse_event("[DONE]")

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
