"""The tokenizer of a GGUF file, built from its metadata into a `tokenizers.Tokenizer`.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (tokenizer.ggml.tokens, with
a type per token and a score), the BPE merges, the special token ids and the chat template as
metadata. Two vocabulary kinds are read (tokenizer.ggml.model):

    "gpt2"   byte-level BPE (Llama 3, Qwen2, SmolLM, ...): tokens are spelled in GPT-2's byte
             alphabet; the text is split first by the regexes llama.cpp uses for the file's
             tokenizer.ggml.pre, then mapped to that alphabet and merged.
    "llama"  SentencePiece BPE (Llama 2, Mistral, ...): "▁" for spaces, byte fallback to <0xNN>
             tokens, merges from the file or, where it has none, from the token scores (the
             better a merged token's score, the earlier its merge), as SentencePiece ranks them.
             Gemma's files (general.architecture gemma*) need two fixes, see `_gemma`.

Tokens typed CONTROL become special added tokens (skipped when decoding with
skip_special_tokens), USER_DEFINED ones plain added tokens, as in transformers' GGUF loader,
which tests/test_real_weights.py and tests/test_gguf.py compare this with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .tokenizer import Tokenizer

# The architectures whose "llama" (SentencePiece) vocabulary is Gemma's (see _gemma).
_GEMMA = ("gemma", "gemma2", "gemma3")
# llama.cpp's token types (gguf.TokenType) that decide how a token is added.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

_GPT2 = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",)
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
# tokenizer.ggml.pre -> the regexes llama.cpp splits the text with, in order (llama-vocab.cpp).
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": _GPT2, "gpt-2": _GPT2, "gpt2": _GPT2, "mpt": _GPT2, "olmo": _GPT2,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3,
    "falcon3": _LLAMA3, "pixtral": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "stablelm2": _QWEN2, "megrez": _QWEN2,
    "smollm": (r"\p{N}",) + _GPT2, "starcoder": (r"\p{N}",) + _GPT2,
    "refact": (r"\p{N}",) + _GPT2, "command-r": (r"\p{N}",) + _GPT2,
    "codeshell": (r"\p{N}",) + _GPT2,
}
# Pre-tokenizers whose whole pieces are looked up before merging (llama.cpp's ignore_merges).
_IGNORE_MERGES = frozenset({"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "pixtral"})


def gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The nanorun Tokenizer of a GGUF file. Raises UnsupportedModelError naming the metadata
    key when the file's tokenizer is not one nanorun builds."""
    from .models.gguf import eos_token_ids, read_gguf

    f = read_gguf(path)
    kind = f.require("tokenizer.ggml.model")
    meta = f.metadata
    tokens = f.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if kind == "gpt2":
        backend = _byte_level(f, tokens)
    elif kind == "llama" and f.architecture in _GEMMA:
        backend = _gemma(tokens)
    elif kind == "llama":
        backend = _sentencepiece(f, tokens, types)
    else:
        raise _unsupported(f, f"tokenizer.ggml.model {kind!r} is not supported; nanorun builds "
                              f"'gpt2' (byte-level BPE) and 'llama' (SentencePiece) vocabularies")
    _add_tokens(backend, tokens, types)
    config = {name: tokens[i] for name, key in _SPECIAL.items()
              if isinstance(i := meta.get(f"tokenizer.ggml.{key}"), int) and 0 <= i < len(tokens)}
    _add_bos_eos(backend, meta, kind, config)
    return Tokenizer(backend, config, _chat_template(meta), generation_eos=eos_token_ids(f))


_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
            "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _unsupported(f, message: str) -> Exception:
    from .models.config import UnsupportedModelError

    return UnsupportedModelError(f"{f.path}: {message}")


def _byte_level(f, tokens: Sequence[str]):
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, pre_tokenizers

    pre = f.metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise _unsupported(f, f"tokenizer.ggml.pre {pre!r} (how text is split before merging) "
                              f"is not one nanorun knows; known: {sorted(PRE_TOKENIZERS)}")
    merges = [tuple(m.split(" ", 1)) for m in f.require("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(f, tokens: Sequence[str], types: Sequence[int]):
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

    meta = f.metadata
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = ([tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
              if "tokenizer.ggml.merges" in meta
              else merges_from_scores(tokens, meta.get("tokenizer.ggml.scores")))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = Backend(models.BPE(vocab, merges, unk_token=tokens[unk] if unk is not None else None,
                                 fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _gemma(tokens: Sequence[str]):
    """Gemma's SentencePiece BPE as transformers' GemmaTokenizer builds it: spaces become "▁"
    by a normalizer (no prefix space, no pre-tokenizer), byte fallback, and a decoder that only
    undoes those. Two fixes its GGUF files need (as transformers' GGUF loader makes them):
    tokens of two or more spaces are stored as spaces ("  ") where the vocabulary is looked up
    as "▁▁", so they are respelled; the file has no merges and its scores do not follow the
    merge order, the tokens' order in the file does, so merges are ranked by position."""
    from tokenizers import Tokenizer as Backend, decoders, models, normalizers

    respelled = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {t: i for i, t in enumerate(respelled)}
    merges = merges_from_scores(respelled, [-float(i) for i in range(len(respelled))])
    backend = Backend(models.BPE(vocab, merges, unk_token="<unk>" if "<unk>" in vocab else None,
                                 fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    return backend


def merges_from_scores(tokens: Sequence[str],
                       scores: Sequence[float] | None) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two
    tokens of the vocabulary is a merge, ranked by the merged token's score (higher first),
    then by the longer left part, the longer right part, the merged token's id and the parts'
    ids: transformers' order (tokenization_utils_base.generate_merges), so that both build the
    same tokenizer. Without scores, a merged token's id ranks it (lower first)."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                key = ((-scores[i], -len(left), -len(right)) if scores is not None
                       else (i, len(left), len(right)))
                ranked.append((key, i, ids[left], ids[right], left, right))
    ranked.sort(key=lambda r: r[:4])
    return [(left, right) for *_, left, right in ranked]


def _add_tokens(backend, tokens: Sequence[str], types: Sequence[int]) -> None:
    """CONTROL tokens as special added tokens, USER_DEFINED ones as plain added tokens: matched
    whole in the text, never cut by the model. A USER_DEFINED token the vocabulary spells
    otherwise (Gemma's runs of spaces) is left to the model, as transformers leaves it."""
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types) if k == _USER_DEFINED
            and backend.token_to_id(t) is not None]
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def _add_bos_eos(backend, meta: Mapping[str, Any], kind: str, config: Mapping[str, str]) -> None:
    """A post-processor that adds BOS (and EOS) where the file says encode adds them; without
    the key, SentencePiece vocabularies add BOS and byte-level ones do not (as llama.cpp)."""
    from tokenizers import processors

    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    bos = config.get("bos_token") if add_bos else None
    eos = config.get("eos_token") if meta.get("tokenizer.ggml.add_eos_token", False) else None
    if bos is None and eos is None:
        return
    ends = [t for t in (bos, eos) if t is not None]
    single = " ".join(x for x in (bos, "$A", eos) if x is not None)
    pair = " ".join(x for x in (bos, "$A", eos, bos, "$B:1", eos) if x is not None)
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(ends)])


def _chat_template(meta: Mapping[str, Any]) -> str | dict[str, str] | None:
    """tokenizer.chat_template, and the named ones (tokenizer.chat_template.<name>) if any."""
    named = {k.removeprefix("tokenizer.chat_template."): v for k, v in meta.items()
             if k.startswith("tokenizer.chat_template.")}
    main = meta.get("tokenizer.chat_template")
    if not named:
        return main
    return {**named, **({"default": main} if main is not None else {})}
