"""Per-request sampling settings, in the shape vLLM users already know."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

# Temperatures below this sample as greedy (argmax), as vLLM does below its _SAMPLING_EPS:
# dividing logits by 1e-50 overflows float32 to inf, and the softmax of that is NaN.
GREEDY_TEMPERATURE = 1e-5
# The most sequences one request may ask for (n), as OpenAI's API bounds it: each is a request
# of its own in the engine, and an unbounded n would queue millions of them from one call.
MAX_N = 128

# torch.Generator.manual_seed takes exactly this range.
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1


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
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._set("stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        self._check_vllm_fields()

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


def _stop_strings(stop: object) -> tuple[str, ...]:
    """None, a string or a list of non-empty strings, as a tuple."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence) or isinstance(stop, bytes):
        raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
    for s in stop:
        if not isinstance(s, str):
            raise TypeError(f"stop must be a string or a list of strings, got an entry {s!r} "
                            f"({type(s).__name__})")
        if not s:
            raise ValueError("stop strings must not be empty")
    return tuple(stop)
