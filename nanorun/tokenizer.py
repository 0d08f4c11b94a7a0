"""The tokenizer and chat template of a Hugging Face model directory.

nanorun reads tokenizer.json with HF `tokenizers` directly, not through transformers'
AutoTokenizer: transformers is only a test dependency, importing it takes ~2 s (tokenizers:
30 ms), and 5.x rebuilds model-specific tokenizers from vocab and merges instead of running
tokenizer.json as written. Chat templates are rendered with jinja2 in the sandbox transformers
configures (trim_blocks, lstrip_blocks, loopcontrols, its tojson and raise_exception), and
tests/test_text.py checks encode, decode and the rendered chats against AutoTokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Named special tokens of tokenizer_config.json, as transformers passes them to chat templates.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
# Files that mean "there is a tokenizer here, but not one nanorun reads".
_OTHER_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                          "tekken.json", "tokenizer.tiktoken")

Message = Mapping[str, Any]


def load_tokenizer(model_dir: str | os.PathLike | None) -> Tokenizer | None:
    """The tokenizer of a HF model directory, or None where there is none (presets have no
    directory). Raises ValueError if the directory has tokenizer files but no tokenizer.json."""
    if model_dir is None:
        return None
    model_dir = os.fspath(model_dir)
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        others = [f for f in _OTHER_TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, f))]
        if others:
            raise ValueError(
                f"{model_dir!r} has {', '.join(others)} but no tokenizer.json, which is what "
                f"nanorun reads; write one with transformers: "
                f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
        return None
    from tokenizers import Tokenizer as Backend    # here: `import nanorun` must not need it

    config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    generation = _read_json(os.path.join(model_dir, "generation_config.json"))
    return Tokenizer(Backend.from_file(path), config, _read_chat_template(model_dir, config),
                     generation_eos=_as_ids(generation.get("eos_token_id")))


class Tokenizer:
    """Text <-> token ids for one model, and its chat template.

    `backend` is a `tokenizers.Tokenizer`; `config` the parsed tokenizer_config.json (may be
    {}); `chat_template` a Jinja string, a dict of named templates, or None.
    """

    def __init__(self, backend, config: Mapping[str, Any] | None = None,
                 chat_template: str | Mapping[str, str] | None = None, *,
                 generation_eos: Sequence[int] = ()) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template
        self.special_tokens = {k: t for k in _SPECIAL_TOKEN_KEYS
                               if (t := _token_text(self.config.get(k))) is not None}
        self._generation_eos = tuple(generation_eos)

    # ---- ids and text -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds what tokenizer.json's post-processor
        adds (BOS, usually). tokenizer_config.json's add_bos_token / add_eos_token are not
        read: save_pretrained writes them into that post-processor, and transformers' generic
        tokenizer class ignores them too."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `token_ids`. No clean_up_tokenization_spaces: like vLLM's streaming
        output, so that the incremental detokenizer's deltas add up to exactly this."""
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str | None]:
        """Vocabulary strings of `token_ids` (None for an id outside the vocabulary)."""
        return [self.backend.id_to_token(i) for i in token_ids]

    def __len__(self) -> int:
        return self.vocab_size

    @cached_property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included (transformers' len(tokenizer)). A model's
        embedding may have more rows (padding), never fewer."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- special tokens -----------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        """The eos_token of tokenizer_config.json."""
        return self.token_to_id(self.special_tokens.get("eos_token"))

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: eos_token plus generation_config.json's eos_token_id
        (chat models list their end-of-turn token there, as vLLM reads it)."""
        first = () if self.eos_token_id is None else (self.eos_token_id,)
        return tuple(dict.fromkeys(first + self._generation_eos))

    @cached_property
    def all_special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special: what skip_special_tokens leaves out."""
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    @cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of <0xNN> tokens when the decoder has ByteFallback (SentencePiece-style): the
        detokenizer holds them until their run of bytes ends, as their text can still change."""
        decoder = self.backend.decoder
        if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
            return frozenset()
        ids = (self.backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        return frozenset(i for i in ids if i is not None)

    # ---- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            *, tokenize: bool = False, chat_template: str | None = None,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None,
                            continue_final_message: bool = False,
                            **template_kwargs: Any) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's chat
        template (or `chat_template`, a Jinja string): the prompt text, or its ids with
        tokenize=True (encoded without adding special tokens: templates write their own BOS).
        `tools` (JSON schemas) and `documents` reach the template as in transformers, and so do
        extra keyword arguments. continue_final_message: the text ends with the final
        message's content, left open for the model to continue (what the template writes after
        it, an end-of-turn token, is cut), as transformers does.

        Raises ValueError when there is no template or the messages are malformed.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be "
                             "true: the final message is continued, not answered")
        template = self._template(chat_template, use_tools=tools is not None)
        variables = {**self.special_tokens, **template_kwargs}
        checked = _check_messages(messages)
        try:
            text = template.render(messages=checked, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:        # includes the template's raise_exception(...)
            raise ValueError(f"the chat template rejected these messages: {e}") from e
        if continue_final_message:
            text = _open_final_message(text, checked[-1].get("content", ""))
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _template(self, override: str | None, use_tools: bool) -> jinja2.Template:
        source = override if override is not None else self.chat_template
        if isinstance(source, Mapping):
            if use_tools and "tool_use" in source:        # transformers' choice, too
                source = {"default": source["tool_use"]}
            if "default" not in source:
                raise ValueError(f"this model has several chat templates {sorted(source)} and no "
                                 f"'default'; pass chat_template=<template text>")
            source = source["default"]
        if source is None:
            raise ValueError(
                "this model has no chat template (no 'chat_template' in tokenizer_config.json nor "
                "a chat_template.jinja); pass chat_template=<Jinja template>, or send a plain "
                "prompt instead of messages")
        return _compile(source)


def _open_final_message(text: str, final: str) -> str:
    """The rendered chat cut after the final message's content (transformers' rule: its last
    occurrence, or that of its stripped form, since templates often trim it)."""
    for content in (final, final.strip()):
        if content and content in text:
            return text[:text.rindex(content) + len(content)]
    raise ValueError("continue_final_message: the final message's content does not appear in "
                     "the rendered chat, so there is nothing to continue (is it empty?)")


def _check_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Plain dicts the template can read; OpenAI-style lists of text parts become one string
    (joined with newlines, as vLLM does for string-content templates)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts, got "
                         f"{type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; give at least one {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got "
                             f"{type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"message {i} needs a non-empty string 'role' (e.g. 'user')")
        # Keys set to None are dropped, as transformers does: templates test for presence.
        msg = {k: v for k, v in m.items() if v is not None}
        if "content" in msg:
            msg["content"] = _content_text(msg["content"], i)
        elif "tool_calls" not in msg:
            raise ValueError(f"message {i} ({m['role']}) has no 'content'")
        out.append(msg)
    return out


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, Mapping)):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ValueError(f"message {i}: content parts must be {{'type': 'text', 'text': "
                                 f"str}}; nanorun serves text models only")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"message {i}: 'content' must be a string or a list of text parts, got "
                     f"{type(content).__name__}")


class _GenerationTag(Extension):
    """{% generation %}...{% endgeneration %} (transformers' assistant-mask marker): renders its
    body, so templates that use it parse here too."""

    tags = {"generation"}

    def parse(self, parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON (transformers').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """A chat template compiled once in a sandbox (templates from the Hub are untrusted code)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja: {e}") from e


def _read_chat_template(model_dir: str, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """chat_template.jinja (and additional_chat_templates/*.jinja) win over tokenizer_config's
    chat_template, as in transformers; a list of {name, template} becomes a dict."""
    templates: dict[str, str] = {}
    main = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(main):
        templates["default"] = _read_text(main)
    extra = os.path.join(model_dir, "additional_chat_templates")
    if os.path.isdir(extra):
        for name in sorted(os.listdir(extra)):
            if name.endswith(".jinja"):
                templates[name.removesuffix(".jinja")] = _read_text(os.path.join(extra, name))
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    return template


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
