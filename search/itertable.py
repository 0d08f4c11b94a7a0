"""Iteration times of one machine, tabulated once so that a cluster simulation can ask millions.

A cluster simulation (search/cluster.py) asks, for every iteration of every machine, how long a
batch of prompt tokens and decode tokens takes. The answer is the engine's own: the planner plans
the batch under the machine's layout, the cost model prices the launches, the simulator runs them
(search/evaluate.Predictor), about 10-50 ms of host time per question. A table over

    n = tokens in the batch, f = decode share of them, c = mean context of a decode token

with trilinear interpolation answers in microseconds. Decode attention is linear in the summed
context, so the c axis interpolates almost exactly; GEMMs are flat (weight-bound) for small n
and linear beyond, which the n grid (denser at small n) follows. The prompt tokens of a
tabulated batch are one chunk from the start of a prompt; for the models this is sized for, a
prompt's attention is a small share of its GEMM work, so where a chunk sits barely matters.

A machine runs the layout of its role: `role_layout` tunes one for batches of prompt tokens only
("prefill", Splitwise's prompt machines), of decode tokens only ("decode", its token machines),
or the trace's steady-state SplitFuse mix ("mixed"), with a short search (search/tune.py) that
also keeps the built-in layouts in the running.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from nanorun.layout import Layout, sequential, tuned_layout

from .evaluate import Predictor
from .tune import Tuner, tune
from .workload import IterationMix, Workload

ROLES = ("prefill", "decode", "mixed")
# Decode shares tabulated per role: a prompt machine never decodes, a token machine never
# prefills, a mixed machine does both.
_SHARES = {"prefill": (0.0,), "decode": (1.0,), "mixed": (0.0, 0.05, 0.25, 0.5, 0.75, 1.0)}
# Fractions of the dense batch tabulated on the n axis (1 token is added below).
_N_FRACTIONS = (1 / 128, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)


@dataclass
class IterationTable:
    """Predicted seconds of one iteration on one machine, by (tokens, decode share, context)."""

    tokens: tuple[int, ...]            # n axis, ascending
    shares: tuple[float, ...]          # f axis, ascending (one value: that role only)
    contexts: tuple[int, ...]          # c axis, ascending
    seconds: np.ndarray                # [len(tokens), len(shares), len(contexts)]
    layout_name: str = ""
    _flat: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._flat = self.seconds.tolist()

    @property
    def batch_tokens(self) -> int:
        return self.tokens[-1]

    def __call__(self, prompt_tokens: int, decode_tokens: int, decode_context: float) -> float:
        """Seconds of an iteration of `prompt_tokens` prompt-chunk tokens and `decode_tokens`
        decode tokens whose contexts average `decode_context` tokens."""
        n = prompt_tokens + decode_tokens
        if n <= 0:
            return 0.0
        if n > self.batch_tokens:
            raise ValueError(f"a batch of {n} tokens is larger than the machine's dense batch "
                             f"({self.batch_tokens}); the scheduler must not form it")
        f = decode_tokens / n
        if len(self.shares) == 1 and abs(f - self.shares[0]) > 1e-9:
            raise ValueError(f"this machine's table covers decode share {self.shares[0]} only "
                             f"(its role), asked for {f:.2f}")
        i, wi = _cell(self.tokens, n)
        j, wj = _cell(self.shares, f)
        k, wk = _cell(self.contexts, decode_context)
        t = self._flat
        total = 0.0
        for di, a in ((0, 1.0 - wi), (1, wi)):
            if not a:
                continue
            for dj, b in ((0, 1.0 - wj), (1, wj)):
                if not b:
                    continue
                row = t[i + di][j + dj]
                total += a * b * (row[k] * (1.0 - wk) + (row[k + 1] * wk if wk else 0.0))
        return total


def _cell(axis: tuple, x: float) -> tuple[int, float]:
    """The grid cell [axis[i], axis[i + 1]] holding x and x's weight toward its upper edge;
    outside the axis, the edge (held flat: contexts past the grid are clipped)."""
    if len(axis) == 1 or x <= axis[0]:
        return 0, 0.0
    if x >= axis[-1]:
        return len(axis) - 2, 1.0
    i = bisect.bisect_right(axis, x) - 1
    return i, (x - axis[i]) / (axis[i + 1] - axis[i])


def token_grid(batch_tokens: int) -> tuple[int, ...]:
    return tuple(sorted({1, *(max(1, round(batch_tokens * f)) for f in _N_FRACTIONS)}))


def context_grid(max_context: int) -> tuple[int, ...]:
    """Decode contexts tabulated: from 64 to the longest the trace reaches, in factors of 4."""
    grid, c = [], 64
    while c < max_context:
        grid.append(c)
        c *= 4
    return tuple(grid + [max(max_context, 65)])


def build_table(predictor: Predictor, layout: Layout, role: str,
                max_context: int) -> IterationTable:
    """Tabulate `layout` on the machine `predictor` models for batches of `role`."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    tokens = token_grid(layout.batch_tokens)
    shares = _SHARES[role]
    contexts = context_grid(max_context)
    seconds = np.zeros((len(tokens), len(shares), len(contexts)))
    for i, n in enumerate(tokens):
        for j, f in enumerate(shares):
            d = int(round(f * n))
            for k, c in enumerate(contexts):
                if d == 0 and k > 0:        # no decode token: the context does not matter
                    seconds[i, j, k] = seconds[i, j, 0]
                    continue
                mix = IterationMix((c,) * d, ((0, n - d),) if n > d else ())
                seconds[i, j, k] = predictor.iteration_seconds(layout, mix)
    return IterationTable(tokens, shares, contexts, seconds, layout.name)


# -- the layout of a role --------------------------------------------------------------------------
@dataclass
class _RoleTuner(Tuner):
    """A Tuner that judges layouts on one role's batches instead of the trace's SplitFuse mix."""

    role: str = "mixed"
    # A token machine decodes at most max_seqs requests, and at an SLO on TBT usually far
    # fewer: its layout is judged on such batches, not on a full dense batch it never runs.
    decode_sizes: tuple[int, ...] = (128, 512)

    def mixes(self, batch_tokens: int) -> list[IterationMix]:
        if self.role == "mixed":
            return super().mixes(batch_tokens)
        if batch_tokens not in self._mixes:
            rng = np.random.default_rng([self.seed, batch_tokens])
            w = self.workload
            if self.role == "prefill":
                prompts = [int(x) for x in rng.choice(w.prompt_lens, size=64)]
                chunks, budget = [], batch_tokens
                for p in prompts:
                    if budget <= 0:
                        break
                    chunks.append((0, min(p, budget)))
                    budget -= p
                self._mixes[batch_tokens] = [IterationMix((), tuple(chunks))]
            else:   # decode: batches of decode tokens at contexts drawn from the trace
                mixes = []
                for d in self.decode_sizes:
                    idx = rng.integers(0, len(w.prompt_lens), size=min(d, batch_tokens))
                    j = rng.integers(1, np.maximum(w.output_lens[idx], 2))
                    mixes.append(IterationMix(tuple(int(c) for c in w.prompt_lens[idx] + j), ()))
                self._mixes[batch_tokens] = mixes
        return self._mixes[batch_tokens]


def role_layout(predictor: Predictor, workload: Workload, role: str, batch_tokens: int, *,
                how: str = "tuned", trials: int = 12, seed: int = 0,
                max_seqs: int = 512) -> Layout:
    """The layout a machine of `role` runs: "tuned" (the best of a `trials`-trial search over
    this role's batches, sequential and overlap), "auto" (a layout file `nanorun tune` wrote
    for this model and GPU, else overlap), "sequential" or "overlap"."""
    if how not in ("tuned", "auto", "sequential", "overlap"):
        raise ValueError(f"unknown layout choice {how!r}: use tuned, auto, sequential or "
                         f"overlap")
    if how == "auto":
        c = predictor.cost
        found = tuned_layout(c.config.name, c.device.name, c.tp, batch_tokens)
        return found or predictor.resolve("overlap", batch_tokens)
    if how != "tuned":
        return predictor.resolve(how, batch_tokens)
    tuner = _RoleTuner(predictor, workload, seed=seed, num_mixes=1, role=role,
                       decode_sizes=(max(1, max_seqs // 4), max_seqs))
    candidates = [sequential(predictor.op_names, batch_tokens),
                  predictor.resolve("overlap", batch_tokens)]
    if trials > 0:
        candidates.append(tune(tuner, trials=trials, seed=seed,
                               space=tuner.space((batch_tokens,))).layout)
    best = max(candidates, key=lambda lo: tuner.score(lo)[0])
    return best
