"""Per-request sampling settings, in the shape vLLM users already know."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

# Temperatures below this sample as greedy (argmax), as vLLM does below its _SAMPLING_EPS:
# dividing logits by 1e-50 overflows float32 to inf, and the softmax of that is NaN.
GREEDY_TEMPERATURE = 1e-5

# torch.Generator.manual_seed takes exactly this range.
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each output token, and when to stop.

    temperature 0 is greedy, and so is any temperature below GREEDY_TEMPERATURE (1e-5); top_k 0
    (or -1) and top_p 1.0 disable those filters. A request with a `seed` samples from its own
    generator, so its tokens do not depend on what it is batched with, nor on whether it was
    preempted and recomputed.

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
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        self._set("stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


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
