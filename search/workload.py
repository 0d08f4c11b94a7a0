"""What one iteration's dense batch looks like under a request trace, in steady state.

Under Dynamic SplitFuse every iteration carries `batch_tokens` tokens: one decode token per
decoding request, and prompt chunks filling the rest. In steady state each request contributes
P prompt tokens and O - 1 decode tokens (its first output token is sampled at the end of its
prefill), so the decode share of the batch is (O - 1) / (P + O - 1) in expectation, and a decode
token attends to a context whose token-weighted mean is E[sum_j (P + j)] / E[O - 1].

`Workload.mix(B)` gives that expected iteration; `Workload.sample_mix(B, rng)` draws one with the
trace's spread of contexts and prompt lengths (the search evaluates a few to judge a layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from nanorun.batch import spread_order


@dataclass(frozen=True)
class IterationMix:
    """One iteration: decode tokens (one per sequence, with their contexts) and prompt chunks
    (start, length) of prompts being prefilled."""

    decode_contexts: tuple[int, ...]
    prompt_chunks: tuple[tuple[int, int], ...]

    @property
    def num_tokens(self) -> int:
        return len(self.decode_contexts) + sum(n for _, n in self.prompt_chunks)

    @property
    def reach(self) -> int:
        """How far into its sequences the iteration reaches: its longest context."""
        return max([*self.decode_contexts, *(s + n for s, n in self.prompt_chunks)], default=0)

    def sequences(self) -> list[tuple[int, int, bool]]:
        """(first position, tokens, is decode) per sequence, in the order the engine lays out
        its batches (nanorun.batch.spread_order): decode tokens spread among prompt chunks."""
        seqs = [(c - 1, 1, True) for c in self.decode_contexts] + \
            [(start, n, False) for start, n in self.prompt_chunks]
        order = spread_order([d for _, _, d in seqs], [n for _, n, _ in seqs])
        return [seqs[i] for i in order]

    def batch(self) -> SimpleNamespace:
        """What the planner and cost model read of a batch: num_tokens and seq_starts (as
        nanorun.batch.Batch has them), plus per-token contexts, decode flags and the number of
        sampled tokens."""
        starts, contexts, decode = [0], [], []
        for first, n, is_decode in self.sequences():
            starts.append(starts[-1] + n)
            contexts.extend(range(first + 1, first + n + 1))
            decode.extend([is_decode] * n)
        # Every decode token samples; a prompt chunk samples when it completes its prompt,
        # which in steady state is all but the last (partial) chunk of the iteration.
        sampled = len(self.decode_contexts) + max(0, len(self.prompt_chunks) - 1)
        return SimpleNamespace(num_tokens=self.num_tokens, seq_starts=tuple(starts),
                               contexts=np.array(contexts, dtype=np.int64),
                               is_decode=np.array(decode, dtype=bool),
                               num_sampled=max(1, sampled))


@dataclass(frozen=True)
class Workload:
    """Request lengths the search optimises for (from a trace, or constant lengths)."""

    name: str
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.prompt_lens) == 0 or len(self.prompt_lens) != len(self.output_lens):
            raise ValueError(f"workload {self.name!r} needs as many prompt as output lengths, "
                             f"and at least one request")
        if np.min(self.prompt_lens) < 1 or np.min(self.output_lens) < 1:
            raise ValueError(f"workload {self.name!r} has a request with an empty prompt or "
                             f"no output; filter the trace first")

    @classmethod
    def from_lengths(cls, name: str, prompt_lens, output_lens, source: str = "") -> "Workload":
        return cls(name, np.asarray(prompt_lens, dtype=np.int64),
                   np.asarray(output_lens, dtype=np.int64), source)

    @classmethod
    def from_trace(cls, spec: str, *, num_requests: int | None = None,
                   length_filter=None, seed: int = 0) -> "Workload":
        """A trace by name, CSV path or const:PxO, as `nanorun bench` takes them."""
        from nanorun.benchmark.traces import load_trace

        if num_requests is None and spec.startswith("const:"):
            num_requests = 1   # every request is alike
        trace = load_trace(spec, num_requests=num_requests, seed=seed,
                           length_filter=length_filter)
        return cls.from_lengths(trace.name, trace.prompt_lens, trace.output_lens, trace.source)

    # -- steady-state statistics ---------------------------------------------------------------
    @property
    def mean_prompt(self) -> float:
        return float(np.mean(self.prompt_lens))

    @property
    def mean_output(self) -> float:
        return float(np.mean(self.output_lens))

    @property
    def decode_share(self) -> float:
        p, o = self.mean_prompt, self.mean_output
        return (o - 1.0) / (p + o - 1.0)

    @property
    def tokens_per_batch_token(self) -> float:
        """Prompt + output tokens a request counts per token it puts through the batch
        ((P + O) / (P + O - 1): the first output token rides on the last prompt token)."""
        p, o = self.mean_prompt, self.mean_output
        return (p + o) / (p + o - 1.0)

    @property
    def decode_context(self) -> float:
        """Token-weighted mean context of a decode token (its position + 1)."""
        p, o = self.prompt_lens.astype(np.float64), self.output_lens.astype(np.float64)
        steps = o - 1.0   # decode steps j = 1 .. O-1 attend to P + j tokens
        total = float(np.sum(steps))
        if total == 0:
            return float(np.mean(p))
        return float(np.sum(steps * p + steps * (steps + 1.0) / 2.0) / total)

    def decode_seqs(self, batch_tokens: int) -> int:
        return min(batch_tokens, int(round(batch_tokens * self.decode_share)))

    def kv_tokens(self, batch_tokens: int) -> float:
        """KV-cache tokens held in steady state: every decoding request's context, plus the
        prompt being prefilled."""
        return self.decode_seqs(batch_tokens) * self.decode_context + self.mean_prompt

    # -- iterations -------------------------------------------------------------------------------
    def mix(self, batch_tokens: int) -> IterationMix:
        d = self.decode_seqs(batch_tokens)
        context = max(1, int(round(self.decode_context)))
        prompt = max(1, int(round(self.mean_prompt)))
        return IterationMix((context,) * d, _fill_chunks(batch_tokens - d, [prompt], 0))

    def sample_mix(self, batch_tokens: int, rng: np.random.Generator) -> IterationMix:
        d = self.decode_seqs(batch_tokens)
        # A decode token's request is drawn in proportion to its decode steps, and its step
        # uniformly among them.
        steps = self.output_lens - 1
        weights = steps / steps.sum() if steps.sum() else None
        idx = rng.choice(len(steps), size=d, p=weights)
        j = rng.integers(1, np.maximum(steps[idx], 1) + 1)
        contexts = tuple(int(c) for c in self.prompt_lens[idx] + j)
        prompts = [int(x) for x in rng.choice(self.prompt_lens, size=64)]
        first_offset = int(rng.integers(0, prompts[0]))
        return IterationMix(contexts, _fill_chunks(batch_tokens - d, prompts, first_offset))


def _fill_chunks(budget: int, prompts: list[int], first_offset: int) -> tuple[tuple[int, int], ...]:
    """Chunks (start, length) of consecutive prompts filling `budget` tokens, the first
    continuing from `first_offset`, the last possibly cut short (SplitFuse)."""
    chunks, i, offset = [], 0, first_offset
    while budget > 0:
        prompt = prompts[i % len(prompts)]
        n = min(budget, prompt - offset)
        chunks.append((offset, n))
        budget -= n
        i, offset = i + 1, 0
    return tuple(chunks)
