"""Prompts: a request's text, token ids or chat messages -> the token ids the engine gets.

Chat messages go through the request's, the server's or the model's chat template; text is
encoded with the model's tokenizer; truncate_prompt_tokens keeps a prompt's last tokens, as
vLLM does. Anything wrong is a BadRequest naming the field, before anything is queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .protocol import BadRequest
from .state import ServerState

# Keys a request's chat_template_kwargs may not set: the server passes them itself.
_RESERVED_TEMPLATE_KWARGS = ("messages", "tokenize", "chat_template", "tools", "documents",
                             "add_generation_prompt", "continue_final_message")


def need_tokenizer(state: ServerState, param: str):
    """The model's tokenizer; a BadRequest on `param` when it has none."""
    if state.tokenizer is None:
        raise BadRequest("this model has no tokenizer: send token ids", param)
    return state.tokenizer


def render_chat(state: ServerState, body, messages: list, add_generation_prompt: bool,
                add_special_tokens: bool) -> list[int]:
    """The chat's token ids through the request's or the server's or the model's template
    (a request's own only with --trust-request-chat-template, as vLLM)."""
    tokenizer = need_tokenizer(state, "messages")
    kwargs = dict(body.chat_template_kwargs or {})
    reserved = sorted(set(kwargs) & set(_RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise BadRequest(f"chat_template_kwargs may not set {reserved}: they are request "
                         f"fields of their own", "chat_template_kwargs")
    if body.chat_template is not None and not state.settings.trust_request_chat_template:
        raise BadRequest("a request's own chat_template needs the server to be started with "
                         "--trust-request-chat-template (as vLLM)", "chat_template")
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=body.continue_final_message, tools=body.tools,
            chat_template=body.chat_template or state.settings.chat_template, **kwargs)
    except ValueError as e:
        param = "chat_template" if "not valid Jinja" in str(e) else "messages"
        raise BadRequest(str(e), param) from None
    # Templates write their own BOS: encoded without special tokens unless asked, as vLLM.
    return _nonempty(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def tokenize_body(state: ServerState, body) -> list[int]:
    """/tokenize's prompt (text) or messages (a chat) as token ids."""
    if (body.prompt is None) == (body.messages is None):
        raise BadRequest("give exactly one of prompt (text) and messages (a chat)",
                         "prompt" if body.prompt is None else "messages")
    if body.prompt is not None:
        for name in ("chat_template", "chat_template_kwargs", "tools"):
            if getattr(body, name) is not None:
                raise BadRequest(f"{name} is for messages, not a prompt", name)
        return need_tokenizer(state, "prompt").encode(
            body.prompt, add_special_tokens=body.add_special_tokens is not False)
    if body.continue_final_message and body.add_generation_prompt:
        raise BadRequest("continue_final_message and add_generation_prompt cannot "
                         "both be true", "continue_final_message")
    return render_chat(state, body, body.messages, body.add_generation_prompt,
                       bool(body.add_special_tokens))


@dataclass
class Prompt:
    """One prompt's token ids, and its text when it came as text (for echo)."""

    ids: list[int]
    text: str | None


def prompt_list(prompt: Any) -> list:
    """A completions prompt as a list of prompts (str or token ids each)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise BadRequest("prompt is empty", "prompt")
    return list(prompt)


def tokenize_prompt(state: ServerState, prompt: str | list[int],
                    add_special_tokens: bool) -> Prompt:
    """One completions prompt (text, or token ids as they are) as a Prompt."""
    if isinstance(prompt, list):
        return Prompt(_nonempty(prompt), None)
    if state.tokenizer is None:
        raise BadRequest("this model has no tokenizer: send the prompt as token ids", "prompt")
    if not prompt:
        raise BadRequest("prompt is empty", "prompt")
    return Prompt(_nonempty(state.tokenizer.encode(prompt, add_special_tokens)), prompt)


def truncated(state: ServerState, prompt: Prompt, body) -> Prompt:
    """truncate_prompt_tokens: the prompt's last N tokens (-1: max_model_len), as vLLM keeps
    them; the engine would cut them alike, but the usage, echo and max_tokens need them
    here."""
    k = body.truncate_prompt_tokens          # checked by check_unsupported
    if k is None:
        return prompt
    if k == -1:
        k = state.max_model_len
    if k > state.max_model_len:
        raise BadRequest(f"truncate_prompt_tokens ({k}) is greater than max_model_len "
                         f"({state.max_model_len}): select a smaller truncation size",
                         "truncate_prompt_tokens")
    if len(prompt.ids) <= k:
        return prompt
    return Prompt(prompt.ids[-k:], None)


def _nonempty(ids: list[int]) -> list[int]:
    if not ids:
        raise BadRequest("prompt is empty: it has no tokens", "prompt")
    return ids
