"""Output-length prediction, for scheduling by predicted service time (Magnus).

Magnus predicts each request's output length (a random forest over the prompt's length and an
embedding of its instruction) and orders the queue by highest response ratio next. A predictor
here is anything with

    predict(prompt_token_ids, sampling_params) -> float     # expected output tokens, >= 1

Two are built in:

- MaxTokensPredictor: the request's own max_tokens. Exact where clients set max_tokens to what
  they expect (and for the benchmark harness, whose requests run to their trace length);
  otherwise an upper bound, and then the ranking is only as good as the bounds are.
- BucketedLengthPredictor: the median output length of requests with a similar prompt length,
  learned from a trace of (prompt, output) lengths. It sees lengths only: no text, so none of
  Magnus's instruction embedding. Fitted on half of each shipped trace and scored on the other
  half, its rank correlation with the true output length is 0.67 on azure-conv (whose prompt
  lengths cluster by application) but 0.05 to 0.28 on azure-code, sharegpt and lmsys
  (bench/results/cpu/scheduling.json, from bench/scheduling.py). A content-aware model can be
  plugged in through the same interface.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .sampling_params import SamplingParams


@runtime_checkable
class LengthPredictor(Protocol):
    def predict(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams) -> float:
        """Expected number of output tokens: at least 1, and (to be of use) at most
        sampling_params.max_tokens; the scheduler takes it as it is."""


class MaxTokensPredictor:
    """Predicts the request's max_tokens."""

    name = "max_tokens"

    def predict(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams) -> float:
        return float(sampling_params.max_tokens)

    def __repr__(self) -> str:
        return "MaxTokensPredictor()"


@dataclass(frozen=True)
class BucketedLengthPredictor:
    """The median output length of the prompt-length bucket a prompt falls in, capped at the
    request's max_tokens.

    Bucket i holds prompts of length <= upper_bounds[i] (and > upper_bounds[i - 1]); prompts
    longer than the last bound take the last bucket. fit() starts from powers of two and merges
    neighbours until each bucket has min_samples requests, so a sparse tail cannot carry a
    median of three outliers.
    """

    upper_bounds: tuple[int, ...]
    medians: tuple[float, ...]
    name: str = "bucketed"

    def __post_init__(self) -> None:
        if not self.upper_bounds or len(self.upper_bounds) != len(self.medians):
            raise ValueError("BucketedLengthPredictor needs one median per bucket, and at least "
                             "one bucket")
        if list(self.upper_bounds) != sorted(set(self.upper_bounds)):
            raise ValueError(f"upper_bounds must be strictly increasing, got "
                             f"{self.upper_bounds}")
        if not all(m >= 1 and math.isfinite(m) for m in self.medians):
            raise ValueError(f"medians must be finite and >= 1, got {self.medians}")

    @classmethod
    def fit(cls, prompt_lens, output_lens, *, min_samples: int = 100,
            name: str = "bucketed") -> BucketedLengthPredictor:
        """Learn from matching arrays of prompt and output lengths (tokens, each >= 1)."""
        prompts = np.asarray(prompt_lens, dtype=np.int64)
        outputs = np.asarray(output_lens, dtype=np.int64)
        if prompts.ndim != 1 or prompts.shape != outputs.shape or len(prompts) == 0:
            raise ValueError(f"prompt_lens and output_lens must be 1-D, of one length and not "
                             f"empty; got shapes {prompts.shape} and {outputs.shape}")
        if prompts.min() < 1 or outputs.min() < 1:
            raise ValueError("prompt and output lengths must be >= 1 token")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        # Power-of-two bucket of each prompt, (2^(k-1), 2^k], then groups of neighbouring
        # buckets with min_samples requests each; a short tail joins the group before it.
        keys = np.ceil(np.log2(prompts)).astype(np.int64)
        groups, current, count = [], [], 0
        for key, n in zip(*np.unique(keys, return_counts=True)):
            current.append(int(key))
            count += int(n)
            if count >= min_samples:
                groups.append(current)
                current, count = [], 0
        if current:
            if groups:
                groups[-1] += current
            else:
                groups.append(current)
        return cls(tuple(2 ** g[-1] for g in groups),
                   tuple(float(np.median(outputs[np.isin(keys, g)])) for g in groups), name)

    @classmethod
    def from_trace(cls, trace: str | os.PathLike, **kwargs) -> BucketedLengthPredictor:
        """Fit on a whole trace that nanorun.benchmark.traces.load_trace reads: a shipped
        trace's name or a CSV path."""
        from .benchmark.traces import load_trace

        t = load_trace(trace)
        return cls.fit(t.prompt_lens, t.output_lens, name=f"bucketed:{t.name}", **kwargs)

    def median_for(self, prompt_len: int) -> float:
        """The learned median output length for a prompt of this many tokens."""
        return self.medians[min(bisect.bisect_left(self.upper_bounds, prompt_len),
                                len(self.medians) - 1)]

    def predict(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams) -> float:
        return min(self.median_for(len(prompt_token_ids)), float(sampling_params.max_tokens))


def predictor_name(predictor: LengthPredictor | None) -> str | None:
    """How reports name a predictor: its `name`, else its class; None for no predictor."""
    if predictor is None:
        return None
    return getattr(predictor, "name", None) or type(predictor).__name__


def get_length_predictor(spec=None) -> LengthPredictor:
    """A predictor from what a user may pass: None or "max_tokens"; a trace to fit a
    BucketedLengthPredictor on (a shipped trace's name, such as "sharegpt", or the path of a CSV
    of your own request log with the columns TIMESTAMP,ContextTokens,GeneratedTokens); or a
    predictor object."""
    if spec is None or spec == "max_tokens":
        return MaxTokensPredictor()
    if isinstance(spec, (str, os.PathLike)):
        from .benchmark.traces import TRACES

        if not os.fspath(spec).startswith("const:"):
            try:
                return BucketedLengthPredictor.from_trace(spec)
            except ValueError as e:
                reason = str(e)
        else:
            reason = "constant lengths have nothing to learn"
        raise ValueError(f"length predictor {os.fspath(spec)!r}: use 'max_tokens', a trace to "
                         f"fit on ({', '.join(TRACES)} or a CSV path), or an object with "
                         f"predict(prompt_token_ids, sampling_params). {reason}")
    if isinstance(spec, LengthPredictor):
        return spec
    raise TypeError(f"length_predictor must be None, a name or an object with "
                    f"predict(prompt_token_ids, sampling_params), got {type(spec).__name__}")
