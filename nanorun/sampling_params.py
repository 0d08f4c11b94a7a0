"""Per-request sampling settings, in the shape vLLM users already know."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

# Temperatures below this sample as greedy (argmax), as vLLM does below its _SAMPLING_EPS:
# dividing logits by 1e-50 overflows float32 to inf, and the softmax of that is NaN.
GREEDY_TEMPERATURE = 1e-5
# The most sequences one request may ask for (n), as OpenAI's API bounds it: each is a request
# of its own in the engine, and an unbounded n would queue millions of them from one call.
MAX_N = 128

# torch.Generator.manual_seed takes exactly this range.
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1
# logit_bias values, as OpenAI documents them.
_BIAS_MAX = 100.0
# The constraint kinds of StructuredOutputsParams: exactly one is given.
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match, as vLLM's StructuredOutputsParams: exactly one of
      json             a JSON schema (a dict, or its JSON text);
      regex            a regular expression the whole output matches;
      choice           a list of strings, the output is one of them;
      grammar          an EBNF (GBNF) grammar as xgrammar takes it, its rule `root`;
      json_object      True: any JSON object;
      structural_tag   vLLM's structural tag JSON (tags with a schema each, and triggers).
    Options: disable_any_whitespace (JSON without optional whitespace: compact output);
    disable_additional_properties and disable_fallback are accepted because xgrammar already
    does what they ask (no properties beyond the schema's; no other backend to fall back to).
    whitespace_pattern is refused: xgrammar has no such setting.

    Checked here for shape; the grammar itself is compiled (and an invalid schema, regex or
    grammar refused) when a request with a tokenizer is made, see nanorun.structured_output.
    """

    json: str | dict | None = field(default=None, hash=False)
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of {', '.join(_CONSTRAINTS)}; "
                             f"got {', '.join(given) or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json":
            if not isinstance(value, (str, Mapping)):
                raise TypeError(f"structured_outputs.json must be a JSON schema (a dict or its "
                                f"JSON text), got {type(value).__name__}")
            if isinstance(value, str) and not value.strip():
                raise ValueError("structured_outputs.json must not be empty")
        elif kind == "choice":
            if isinstance(value, str) or not isinstance(value, Sequence) or not value:
                raise ValueError(f"structured_outputs.choice must be a non-empty list of "
                                 f"strings, got {value!r}")
            if not all(isinstance(c, str) for c in value):
                raise TypeError("structured_outputs.choice must be a list of strings")
            object.__setattr__(self, "choice", tuple(value))
        elif kind == "json_object":
            if value is not True:
                raise ValueError("structured_outputs.json_object must be True if given; leave "
                                 "structured_outputs out for unconstrained output")
        elif not isinstance(value, str) or not value.strip():
            raise ValueError(f"structured_outputs.{kind} must be a non-empty string")
        elif kind == "regex" and "\x00" in value:
            raise ValueError("structured_outputs.regex must not contain a NUL character")
        for name in ("disable_any_whitespace", "disable_additional_properties",
                     "disable_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"structured_outputs.{name} must be True or False")
        if self.whitespace_pattern is not None:
            raise ValueError("structured_outputs.whitespace_pattern is not supported by "
                             "nanorun (xgrammar has no such setting); use "
                             "disable_any_whitespace for compact JSON")

    @property
    def kind(self) -> str:
        """Which constraint this is: json, regex, choice, grammar, json_object, structural_tag."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) is not None)

    @classmethod
    def of(cls, value: object) -> "StructuredOutputsParams":
        """A StructuredOutputsParams as it is, or one from a dict of its fields (the server's
        JSON), refusing unknown keys by name."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"structured_outputs must be a StructuredOutputsParams or a dict of "
                            f"its fields, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, value)) - known)
        if unknown:
            raise ValueError(f"structured_outputs has no field {unknown[0]!r}; it takes "
                             f"{', '.join(sorted(known))}")
        return cls(**value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each output token, and when to stop.

    Fields, names, defaults and ranges are vLLM's:
      n                      output sequences per prompt (>= 1); sequence i samples with
                             seed + i when a seed is given.
      temperature            0 (or below GREEDY_TEMPERATURE, 1e-5) is greedy.
      top_k, top_p, min_p    filters: top_k 0 (or -1), top_p 1.0 and min_p 0.0 disable them;
                             min_p drops tokens below min_p * the most likely one's probability.
      presence_penalty, frequency_penalty   in [-2, 2], subtracted from the logits of tokens
                             already in the output (once, and once per occurrence).
      repetition_penalty     > 0; the logits of tokens in the prompt or the output are divided
                             by it where positive, multiplied where negative (1.0: off).
      seed                   the request's own random stream: its tokens do not depend on what
                             it is batched with, nor on whether it was preempted and recomputed.
      stop, stop_token_ids   stop strings (text; a tuple) and token ids that end the output
                             with finish_reason "stop"; include_stop_str_in_output keeps the
                             stop string in the text.
      ignore_eos             keep going past EOS.
      max_tokens, min_tokens output length bounds; before min_tokens, EOS and stop_token_ids
                             cannot be sampled and stop strings do not count.
      logprobs               None, or the number of most likely tokens to return with each
                             sampled one's logprob (0: the sampled token alone; -1: the whole
                             vocabulary, within the engine's max_logprobs).
      prompt_logprobs        the same for every prompt token.
      skip_special_tokens    leave special tokens out of the output text.
      spaces_between_special_tokens   vLLM's; tokenizer.json (fast) tokenizers decode special
                             tokens as their decoder writes them either way (as transformers'
                             fast decode and vLLM's fast detokenizer do), so it changes nothing.
      truncate_prompt_tokens keep only the prompt's last N tokens (-1: max_model_len), as
                             vLLM truncates them (left); None keeps it whole.
      logit_bias             {token id: bias in [-100, 100]} added to those tokens' logits.
      allowed_token_ids      only these tokens may be sampled.
      bad_words              strings that never appear as the output's tokens: a word's last
                             token is masked wherever the output ends with the rest of it
                             (alone and after a space, as vLLM tokenizes them; text, so a
                             TextEngine's or LLM's).
      structured_outputs     a StructuredOutputsParams (or a dict of its fields): the output
                             follows its JSON schema, regex, choice or grammar (a TextEngine's
                             or LLM's: it needs the tokenizer).

    Every field is checked here, so a request that would fail inside a step is refused when it
    is made: ints must be ints (not bools, not floats with a fractional part), floats finite.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    logit_bias: dict[int, float] | None = field(default=None, hash=False)
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._set("max_tokens", _as_int("max_tokens", self.max_tokens))
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        self._set("temperature", _as_float("temperature", self.temperature))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        self._set("top_k", _as_int("top_k", self.top_k))
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 1, or 0 / -1 to disable it, got {self.top_k}")
        self._set("top_p", _as_float("top_p", self.top_p))
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            self._set("seed", _as_int("seed", self.seed))
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._set("stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        if self.truncate_prompt_tokens is not None:
            k = _as_int("truncate_prompt_tokens", self.truncate_prompt_tokens)
            if k == 0 or k < -1:
                raise ValueError(f"truncate_prompt_tokens must be an integer >= 1 or -1 "
                                 f"(max_model_len), got {k}")
            self._set("truncate_prompt_tokens", k)
        self._check_vllm_fields()
        self._check_logits_fields()

    def _check_logits_fields(self) -> None:
        """logit_bias, allowed_token_ids, bad_words, structured_outputs (their token ids are
        checked against the vocabulary by the engine)."""
        if self.logit_bias is not None:
            self._set("logit_bias", _logit_bias(self.logit_bias))
        if self.allowed_token_ids is not None:
            self._set("allowed_token_ids", _token_ids("allowed_token_ids",
                                                      self.allowed_token_ids))
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty (leave it out to allow "
                                 "every token)")
        if self.bad_words is not None:
            words = _stop_strings(self.bad_words, "bad_words")
            self._set("bad_words", words or None)
        if self.structured_outputs is not None:
            self._set("structured_outputs", StructuredOutputsParams.of(self.structured_outputs))

    def _check_vllm_fields(self) -> None:
        self._set("n", _as_int("n", self.n))
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            self._set(name, _as_float(name, getattr(self, name)))
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        self._set("repetition_penalty", _as_float("repetition_penalty", self.repetition_penalty))
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 disables it), got "
                             f"{self.repetition_penalty}")
        self._set("min_p", _as_float("min_p", self.min_p))
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self._set("stop", _stop_strings(self.stop))
        self._set("min_tokens", _as_int("min_tokens", self.min_tokens))
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got "
                             f"{self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                self._set(name, _as_int(name, getattr(self, name)))
                if getattr(self, name) < -1:
                    raise ValueError(f"{name} must be None, >= 0 (the number of top tokens "
                                     f"to return) or -1 (the whole vocabulary), got "
                                     f"{getattr(self, name)}")

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_tokenizer(self) -> str | None:
        """The first field that only a text layer (TextEngine, LLM) can act on, or None."""
        if self.stop:
            return "stop"
        if self.bad_words:
            return "bad_words"
        if self.structured_outputs is not None:
            return "structured_outputs"
        return None

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


def _as_int(name: str, value: object) -> int:
    """An int (numpy integers included); refuses bools and floats, which int() would truncate."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _token_ids(name: str, ids: object) -> tuple[int, ...]:
    """Any iterable of non-negative ints (lists are what users pass), stored as a hashable tuple.
    The engine checks them against the model's vocabulary."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"{name} must be a list of token ids, got {ids!r}")
    out = tuple(_as_int(f"{name} entry", t) for t in ids)
    bad = [t for t in out if t < 0]
    if bad:
        raise ValueError(f"{name} must be non-negative token ids, got {bad[0]}")
    return out


def _logit_bias(bias: object) -> dict[int, float]:
    """{token id: bias}: ids as ints (JSON gives them as strings of digits), biases finite
    numbers in [-100, 100], as OpenAI and vLLM bound them."""
    if not isinstance(bias, Mapping):
        raise TypeError(f"logit_bias must be a dict of token id -> bias, got "
                        f"{type(bias).__name__}")
    out = {}
    for key, value in bias.items():
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        token = _as_int("logit_bias key", key)
        if token < 0:
            raise ValueError(f"logit_bias keys must be non-negative token ids, got {token}")
        value = _as_float(f"logit_bias[{token}]", value)
        if not -_BIAS_MAX <= value <= _BIAS_MAX:
            raise ValueError(f"logit_bias[{token}] must be in [-100, 100], got {value}")
        out[token] = value
    return out


def _stop_strings(stop: object, name: str = "stop") -> tuple[str, ...]:
    """None, a string or a list of non-empty strings, as a tuple."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence) or isinstance(stop, bytes):
        raise TypeError(f"{name} must be a string or a list of strings, got {stop!r}")
    for s in stop:
        if not isinstance(s, str):
            raise TypeError(f"{name} must be a string or a list of strings, got an entry {s!r} "
                            f"({type(s).__name__})")
        if not s:
            raise ValueError(f"{name} strings must not be empty")
    return tuple(stop)
