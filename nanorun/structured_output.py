"""Structured outputs and bad words: what a request's next token may be, as a token bitmask.

Text sits between the user and the engine's token ids (STYLE.md): a grammar is compiled here,
in the text layer, against the tokenizer, and reaches the core only as a TokenConstraint on
the request (nanorun.sampler): the sampler asks it for the next token's bitmask on the host
while it prepares an iteration, masks the logits on their device, and the engine feeds it each
token it reads back. What it compiles, as vLLM's xgrammar backend does:

  json            xgrammar's JSON-schema grammar (strict: no properties beyond the schema's;
                  any whitespace unless disable_any_whitespace);
  json_object     the JSON schema {"type": "object"} (any object, as vLLM compiles it);
  regex, grammar  xgrammar's regex and EBNF (GBNF) compilers; the grammar's rule is `root`;
  choice          an EBNF alternation of the choices as literal strings;
  structural_tag  vLLM's JSON: {"structures": [{begin, schema, end}], "triggers": [...]}, or
                  xgrammar's own structural-tag format.

An invalid schema, regex or grammar is a ValueError naming the field when the request is made
(the server's 400). The grammar's stop tokens are the request's EOS ids: EOS is allowed only
where the grammar accepts, and a grammar that reaches its end (accepting, no continuation)
ends the request with finish_reason "stop", as in vLLM.

Bad words follow vLLM: each word is tokenized alone and after a space; a one-token word is
never sampled, a longer one's last token is masked where the output ends with the rest.

xgrammar (and through it transformers) is imported on first use: `import nanorun` and requests
without a grammar never pay for it.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

    from .tokenizer import Tokenizer

# xgrammar's bitmask: token t is allowed iff bit t % 32 of word t // 32 is set.
BITS = 32


def bitmask_words(vocab_size: int) -> int:
    """The int32 words of one row of a bitmask over vocab_size tokens."""
    return -(-vocab_size // BITS)


class GrammarCompiler:
    """Compiles StructuredOutputsParams against one tokenizer and model vocabulary (the
    logits' width, which may exceed the tokenizer's), caching compiled grammars."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler = None
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        """The compiled grammar; ValueError naming the field if it is not valid."""
        kind = params.kind
        compiler = self._xgrammar_compiler()
        try:
            if kind == "json":
                schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
                return compiler.compile_json_schema(
                    schema, any_whitespace=not params.disable_any_whitespace)
            if kind == "json_object":      # an object, not any JSON value (as vLLM)
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=not params.disable_any_whitespace)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "grammar":
                return compiler.compile_grammar(params.grammar)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(params.choice))
            return self._compile_structural_tag(compiler, params.structural_tag)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs.{kind} is not a valid {_WHAT[kind]}: "
                             f"{_first_line(e)}") from None

    def _compile_structural_tag(self, compiler, spec: str) -> xgrammar.CompiledGrammar:
        """vLLM's structural tag: its legacy shape ({"structures", "triggers"}) as xgrammar's
        tag items; anything else as xgrammar's own structural-tag JSON."""
        import xgrammar as xgr

        try:
            tag = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e})") from None
        if isinstance(tag, dict) and "structures" in tag:
            items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]),
                                           end=s["end"]) for s in tag["structures"]]
            return compiler.compile_structural_tag(items, tag.get("triggers", []))
        return compiler.compile_structural_tag(spec)

    def _xgrammar_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(
                    _hf_tokenizer(self.tokenizer), vocab_size=self.vocab_size,
                    stop_token_ids=list(self.tokenizer.eos_token_ids) or None)
                # One thread: compiling shares the engine's few cores with the model.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler


_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
         "grammar": "EBNF grammar", "choice": "choice list",
         "structural_tag": "structural tag"}


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose sentences are exactly the choices (as vLLM builds it). JSON's
    string escapes are the EBNF literal's: quotes, backslashes and control characters."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class RequestConstraint:
    """One output sequence's grammar state and bad words (sampler.TokenConstraint): the host
    fills the next token's bitmask row and advances by every token read back."""

    def __init__(self, grammar: xgrammar.CompiledGrammar | None,
                 bad_words: Sequence[Sequence[int]] = (),
                 stop_token_ids: Sequence[int] = ()) -> None:
        self._matcher = None
        if grammar is not None:
            import xgrammar as xgr

            self._matcher = xgr.GrammarMatcher(
                grammar, override_stop_tokens=list(stop_token_ids) or None)
        self._single = sorted({w[0] for w in bad_words if len(w) == 1})
        self._multi = [tuple(w) for w in bad_words if len(w) > 1]
        self._history: list[int] = []          # the last tokens the multi-token words need
        self._keep = max((len(w) for w in self._multi), default=1) - 1

    @property
    def is_terminated(self) -> bool:
        """The grammar has ended (its stop token accepted, or nothing can follow)."""
        return self._matcher is not None and self._matcher.is_terminated()

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 words, xgrammar's layout);
        the row starts with every bit set."""
        if self._matcher is not None and not self._matcher.is_terminated():
            self._matcher.fill_next_token_bitmask(bitmask, row)
        banned = list(self._single)
        for word in self._multi:
            if tuple(self._history[len(self._history) - len(word) + 1:]) == word[:-1]:
                banned.append(word[-1])
        if banned:
            clear_bits(bitmask[row], banned)

    def accept_token(self, token: int) -> bool:
        """Advance by a token read back; False if the grammar does not allow it."""
        if self._keep:
            self._history = (self._history + [token])[-self._keep:]
        if self._matcher is None or self._matcher.is_terminated():
            return True
        return self._matcher.accept_token(token)


def clear_bits(words: np.ndarray, tokens: Sequence[int]) -> None:
    """Disallow `tokens` in one bitmask row (int32 words)."""
    ids = np.asarray(tokens, dtype=np.int64)
    ids = ids[ids < len(words) * BITS]
    bits = (np.int64(1) << (ids % BITS)).astype(np.uint32).view(np.int32)
    np.bitwise_and.at(words, ids // BITS, ~bits)


def set_only(words: np.ndarray, tokens: Sequence[int]) -> None:
    """Keep only `tokens` allowed in one bitmask row (int32 words)."""
    allowed = np.zeros_like(words)
    ids = np.asarray(tokens, dtype=np.int64)
    ids = ids[ids < len(words) * BITS]
    bits = (np.int64(1) << (ids % BITS)).astype(np.uint32).view(np.int32)
    np.bitwise_or.at(allowed, ids // BITS, bits)
    words &= allowed


def bad_words_token_ids(tokenizer: Tokenizer, words: Sequence[str],
                        vocab_size: int) -> list[list[int]]:
    """Each bad word's token sequences, as vLLM makes them: the word (left-stripped) alone,
    and after a space where that tokenizes to as many tokens but a different first one."""
    out: list[list[int]] = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        for ids in (alone, spaced):
            if not ids or (ids is spaced and (len(ids) != len(alone) or ids[0] == alone[0])):
                continue
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"bad_words {word!r} encodes to token {bad[0]}, outside the "
                                 f"model's vocabulary [0, {vocab_size})")
            out.append(ids)
    return out


def _hf_tokenizer(tokenizer: Tokenizer):
    """transformers' view of nanorun's tokenizers.Tokenizer, which is what xgrammar reads its
    vocabulary and encoding (byte-level, byte fallback, prefix space) from."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    eos = list(tokenizer.eos_token_ids)
    if eos and hf.eos_token_id is None:
        hf.eos_token = tokenizer.backend.id_to_token(eos[0])
    return hf


def _first_line(e: Exception) -> str:
    """The message of an xgrammar error, without its "[time] source.cc:line: " prefix."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", line)
