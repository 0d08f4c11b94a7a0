"""Token ids -> text while a request streams, and stop strings.

One `IncrementalDetokenizer` per request turns each step's new token ids into the text they
add (a delta). Concatenated, the deltas are exactly the request's output text:

    text = decode(ctx + output_ids)[len(decode(ctx)):]

where ctx is the prompt's last few tokens, up to its last stable cut (see below; none for
an empty prompt, when text is exactly decode(output_ids)). Decoding in the prompt's context is what vLLM and TGI do: a
SentencePiece tokenizer strips the leading space of the first token it decodes, so "my name
is" continues as " John", not "John".

How (vLLM's prefix/read offsets over a window of ids): each step decodes ids[prefix:] and
ids[prefix:read] and emits the difference. The window always starts with a token whose text
is already out, so the first-token rules of decoders (SentencePiece's leading space,
WordPiece's "##") only touch text that is subtracted. `read` moves only to a cut that later
tokens cannot change: the text there does not end in U+FFFD (an incomplete UTF-8 character of
a byte-level BPE), and the last token is not a <0xNN> byte token of a byte-fallback
tokenizer (its run of bytes is decoded as a whole, so a later byte can turn it all into
U+FFFD). At finish, everything held is flushed.

Stop strings (vLLM's semantics): the output ends where the first stop string to complete
starts (or, with include_stop_str_in_output, ends with it); among stops completing at the same
character, the longest wins, so the result does not depend on how text arrives. While running,
the longest tail of the text that could begin a stop string is held back, so no text past a
stop is ever emitted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 6      # prompt tokens decoded ahead of the output: enough for first-token rules
_CUTS_TRIED = 6          # cuts tried backwards per step: a UTF-8 character is at most 4 bytes


class StreamDecoder:
    """Stable text of a growing list of token ids (no stop strings)."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skipped = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        self._bytes = tokenizer.byte_token_ids
        self.ids = self._context(list(prompt_token_ids))
        self.num_context = len(self.ids)
        self._prefix = 0
        self._read = len(self.ids)
        self._prefix_text = self._decode(0, self._read)

    @property
    def context_ids(self) -> list[int]:
        """The prompt tokens the output is decoded after (see the module docstring)."""
        return self.ids[:self.num_context]

    def step(self, new_token_ids: Iterable[int]) -> str:
        """Append token ids; return the text that became stable."""
        self.ids.extend(new_token_ids)
        cut = self._stable_cut()
        return "" if cut is None else self._advance(cut)

    def flush(self) -> str:
        """Everything not yet returned, stable or not (the request has finished)."""
        return self._advance(len(self.ids)) if len(self.ids) > self._read else ""

    def _advance(self, cut: int) -> str:
        text = self._decode(self._prefix, cut)
        delta = text[len(self._prefix_text):]
        # The next window starts at the old read offset only if that keeps a decoded token in
        # front of the new text; otherwise a decoder's first-token rule would reach it.
        if self._has_text_token(self._read, cut):
            self._prefix = self._read
            text = self._decode(self._prefix, cut)
        self._read, self._prefix_text = cut, text
        return delta

    def _stable_cut(self) -> int | None:
        """The furthest offset past `read` whose decoded text no later token can change."""
        lo = max(self._read, len(self.ids) - _CUTS_TRIED)
        for cut in range(len(self.ids), lo, -1):
            last = _last_text_token(self.ids, cut, self._skipped)
            if last is not None and last in self._bytes:
                continue
            if not self._decode(self._prefix, cut).endswith(_REPLACEMENT):
                return cut
        return None

    def _context(self, prompt: list[int]) -> list[int]:
        """The prompt's last few tokens up to a stable cut, with at least one token of text."""
        tail = prompt[-_CONTEXT_TOKENS:]
        for cut in range(len(tail), 0, -1):
            last = _last_text_token(tail, cut, self._skipped)
            if last is None:
                break                            # nothing but skipped specials left
            text = self.tokenizer.decode(tail[:cut], self.skip_special_tokens)
            if last not in self._bytes and not text.endswith(_REPLACEMENT):
                return tail[:cut]
        return []

    def _has_text_token(self, lo: int, hi: int) -> bool:
        return any(i not in self._skipped for i in self.ids[lo:hi])

    def _decode(self, lo: int, hi: int) -> str:
        return self.tokenizer.decode(self.ids[lo:hi], self.skip_special_tokens)


def _last_text_token(ids: list[int], cut: int, skipped: frozenset[int]) -> int | None:
    """The last id before `cut` that decoding does not skip."""
    for i in range(cut - 1, -1, -1):
        if ids[i] not in skipped:
            return ids[i]
    return None


class StopChecker:
    """Finds stop strings in text that arrives in pieces, and says what may be emitted."""

    def __init__(self, stop: str | Sequence[str] | None = None,
                 include_stop_str_in_output: bool = False) -> None:
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stop = tuple(dict.fromkeys(stops))
        self.include_stop_str_in_output = include_stop_str_in_output
        self.text = ""            # all text received, until a stop truncates it
        self.emitted = 0          # characters of `text` handed out so far
        self.stopped_on: str | None = None

    def feed(self, new_text: str, *, final: bool = False, check: bool = True) -> str:
        """Add `new_text`; return what may be emitted now. `check=False` (before min_tokens)
        ignores stop strings that complete in this text; `final` releases what is held."""
        if self.stopped_on is not None:
            return ""
        start = len(self.text)
        self.text += new_text
        found = self._first_stop(start) if check else None
        if found is not None:
            at, s = found
            self.stopped_on = s
            self.text = self.text[:at + len(s) if self.include_stop_str_in_output else at]
            return self._emit(len(self.text))
        return self._emit(len(self.text) - (0 if final else self._held()))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out, self.emitted = self.text[self.emitted:upto], upto
        return out

    def _first_stop(self, start: int) -> tuple[int, str] | None:
        """(position, stop) of the stop string completing first after `start`."""
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            at = self.text.find(s, max(0, start - len(s) + 1))
            if at >= 0:
                key = (at + len(s), -len(s), s)      # earliest end, then the longest
                best = key if best is None or key < best else best
        return None if best is None else (best[0] - len(best[2]), best[2])

    def _held(self) -> int:
        """Length of the longest tail of the text that is the start of a stop string (with
        include_stop_str_in_output nothing is held: a partial stop is output either way)."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        longest = min(max(map(len, self.stop)) - 1, len(self.text) - self.emitted)
        for n in range(longest, 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


class IncrementalDetokenizer:
    """A request's output text, step by step, with stop strings.

    >>> detok = IncrementalDetokenizer(tok, prompt_ids, stop=["\\n\\n"])
    >>> delta = detok.step(new_token_ids)        # each engine step; "" while text is held
    >>> if detok.finished_by_stop: ...           # finish the request: finish_reason "stop"
    >>> delta = detok.step(last_ids, stop_token=ended_on_eos) + detok.finish()   # it ended

    Stop strings are looked for only once min_tokens output tokens exist (vLLM's min_tokens):
    one that completes in text that came out earlier does not count.
    `text` is everything emitted so far; after finish() or a stop it is the output text.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), *,
                 skip_special_tokens: bool = True, stop: str | Sequence[str] | None = None,
                 include_stop_str_in_output: bool = False, min_tokens: int = 0) -> None:
        self._decoder = StreamDecoder(tokenizer, prompt_token_ids, skip_special_tokens)
        self._stops = StopChecker(stop, include_stop_str_in_output)
        self.min_tokens = min_tokens
        self.num_tokens = 0
        self.text = ""

    @property
    def stop_reason(self) -> str | None:
        """The stop string the output ended on, else None."""
        return self._stops.stopped_on

    @property
    def finished_by_stop(self) -> bool:
        return self._stops.stopped_on is not None

    def step(self, new_token_ids: Sequence[int], *, stop_token: bool = False) -> str:
        """Take this step's new output token ids; return the text they add.

        stop_token=True: the last id is the EOS or stop token that ended the request. As in
        vLLM, its text is left out unless include_stop_str_in_output (it only shows at all
        with skip_special_tokens=False, or for a stop_token_ids entry that is not special).
        """
        if self.finished_by_stop:
            return ""
        new_token_ids = list(new_token_ids)
        self.num_tokens += len(new_token_ids)
        if stop_token and new_token_ids and not self._stops.include_stop_str_in_output:
            new_token_ids.pop()
        piece = self._decoder.step(new_token_ids)
        return self._out(self._stops.feed(piece, check=self.num_tokens >= self.min_tokens))

    def finish(self) -> str:
        """The rest of the text once the request has ended (max_tokens, EOS, abort)."""
        if self.finished_by_stop:
            return ""
        piece = self._decoder.flush()
        return self._out(self._stops.feed(piece, final=True,
                                          check=self.num_tokens >= self.min_tokens))

    def _out(self, delta: str) -> str:
        self.text += delta
        return delta
