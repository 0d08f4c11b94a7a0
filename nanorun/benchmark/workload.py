"""What a benchmark sends: a trace's requests with their prompts, and the workloads whose prompts
share prefixes, as real traffic does (issue 28): a system prompt every request starts with, and
multi-turn conversations.

A trace row is a request: its prompt and output lengths. Prompts are seeded random token ids
(the lengths are what the published traces give; their text is not published).

- Shared system prompt (`Prefixes.system_prompt_len` = S): every prompt is the same S tokens
  followed by the row's own prompt, so a prefix cache computes the S tokens once.
- Conversations (`Prefixes.turns` = T > 1): T consecutive rows of the trace are the T turns of
  one conversation; a row's prompt length is that turn's new user message and its output
  length the answer's. Turn k sends the conversation so far (the system prompt if any, every
  earlier user message and the answer the engine gave to it) plus its new message, and is sent
  only after turn k - 1's answer has arrived and a think time has passed (exponential, mean
  `Prefixes.think_time` seconds, seeded). The request rate is then the rate at which
  conversations start. The answers are the engine's own tokens, so each turn's prompt is
  exactly what a chat client would resend; their lengths are the trace's (EOS ignored), so
  every prompt's length is known before the run.

A conversation that would outgrow the model's context or the KV cache is skipped whole.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, replace

import numpy as np

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .loop import ScheduledSource, Submission
from .traces import Trace

logger = logging.getLogger("nanorun")


@dataclass(frozen=True)
class Prefixes:
    """How a workload's prompts share prefixes (module docstring). The default shares none."""

    system_prompt_len: int = 0      # tokens every prompt starts with
    turns: int = 1                  # turns per conversation (1: independent requests)
    think_time: float = 0.0         # mean seconds between an answer and the next turn

    def __post_init__(self) -> None:
        if isinstance(self.system_prompt_len, bool) or self.system_prompt_len < 0:
            raise ValueError(f"system_prompt_len must be a non-negative number of tokens, "
                             f"got {self.system_prompt_len!r}")
        if isinstance(self.turns, bool) or self.turns < 1:
            raise ValueError(f"turns must be at least 1 (1: no conversations), got "
                             f"{self.turns!r}")
        if not 0 <= self.think_time < float("inf"):
            raise ValueError(f"think_time must be a non-negative number of seconds, got "
                             f"{self.think_time!r}")
        if self.think_time and self.turns == 1:
            raise ValueError("think_time is the pause between a conversation's turns: give "
                             "turns > 1 with it")

    def describe(self) -> dict:
        """The report's record of the prefixes."""
        return {"system_prompt_len": self.system_prompt_len, "turns": self.turns,
                "think_time_s": self.think_time}


@dataclass(frozen=True)
class Workload:
    """The requests every engine runs: one per trace row, with its prompt.

    trace.prompt_lens are the lengths each request sends (a conversation's turn: everything it
    resends). prompts[i] holds request i's own token ids: its whole prompt, or for a
    conversation's turn only its new user message (the rest is the conversation so far).
    think_times[i]: seconds between the previous turn's answer and turn i (0 for first turns).
    """

    trace: Trace
    prompts: tuple[np.ndarray, ...]
    num_skipped: int = 0
    skip_reason: str = ""
    prefixes: Prefixes = Prefixes()
    system_prompt: tuple[int, ...] = ()
    think_times: np.ndarray | None = None

    @classmethod
    def fit(cls, trace: Trace, engine, seed: int, prefixes: Prefixes = Prefixes()) -> Workload:
        """Drop (with a warning) the requests the engine can never hold; draw seeded prompts."""
        kv = engine.kv_cache
        max_total = min(engine.max_model_len, kv.num_pages * kv.page_size)
        return cls.fit_limits(trace, max_total, engine.model_config.vocab_size, seed,
                              f"prompt + output longer than the model's context "
                              f"({engine.max_model_len} tokens) or the KV cache "
                              f"({kv.capacity_tokens} tokens)", prefixes)

    @classmethod
    def fit_limits(cls, trace: Trace, max_total: int, vocab_size: int, seed: int,
                   reason: str, prefixes: Prefixes = Prefixes()) -> Workload:
        """Drop (with a warning naming `reason`) the requests, or whole conversations, of more
        than max_total prompt + output tokens; draw seeded prompts of ids in [0, vocab_size).
        The HTTP client fits to what a server says it holds, the in-process runner to its
        engine."""
        turns, system = prefixes.turns, prefixes.system_prompt_len
        if len(trace) < turns:
            raise ValueError(f"trace {trace.name!r} has {len(trace)} requests, fewer than one "
                             f"conversation of {turns} turns; ask for more requests")
        trace = _subset(trace, np.arange(len(trace)) < len(trace) // turns * turns)
        sent = _sent_lens(trace, turns) + system
        totals = (sent + trace.output_lens).reshape(-1, turns)
        fits = np.repeat(totals[:, -1] <= max_total, turns)    # a conversation's last turn
        skipped = int((~fits).sum())
        if skipped:
            if skipped == len(trace):
                raise ValueError(f"every request of trace {trace.name!r} has {reason}; add "
                                 f"a --filter or use shorter requests")
            what = "requests" if turns == 1 else f"turns (whole {turns}-turn conversations)"
            logger.warning("skipping %d of %d %s: %s. Add --filter to choose which.",
                           skipped, len(trace), what, reason)
            trace, sent = _subset(trace, fits), sent[fits]
        rng = np.random.default_rng(seed)
        system_ids = tuple(int(t) for t in rng.integers(0, vocab_size, size=system))
        own = tuple(rng.integers(0, vocab_size, size=int(n)) for n in trace.prompt_lens)
        if turns == 1:      # each request's whole prompt: the system prompt, then its own
            own = tuple(np.concatenate([np.asarray(system_ids, dtype=own[0].dtype), p])
                        for p in own)
        think = rng.exponential(prefixes.think_time, size=len(trace)) if turns > 1 else None
        if think is not None:
            think[::turns] = 0.0
        return cls(replace(trace, prompt_lens=sent), own, skipped, reason if skipped else "",
                   prefixes, system_ids, think)

    @property
    def num_conversations(self) -> int:
        return len(self.trace) // self.prefixes.turns

    def starts(self) -> Trace:
        """The rows that arrive on their own (first turns): what request rates schedule."""
        keep = np.arange(len(self.trace)) % self.prefixes.turns == 0
        return _subset(self.trace, keep)

    def source(self, arrivals: np.ndarray):
        """The requests as the step loop takes them. arrivals: seconds from the start, one per
        row of starts() (every row, without conversations)."""
        if self.prefixes.turns == 1:
            return ScheduledSource([
                Submission(str(i), self.prompts[i].tolist(), greedy(int(n)), float(arrivals[i]))
                for i, n in enumerate(self.trace.output_lens)])
        return ConversationSource(self, arrivals)


class ConversationSource:
    """Multi-turn conversations for the step loop: a conversation's first turn is due at its
    start; each later turn is due its think time after the previous answer arrived, and
    resends the conversation so far (module docstring). A failed turn ends its conversation:
    its later turns are never sent."""

    def __init__(self, workload: Workload, starts: np.ndarray) -> None:
        self._w, self._turns = workload, workload.prefixes.turns
        self._context: dict[int, list[int]] = {}
        self._ready = [(float(t), c * self._turns) for c, t in enumerate(starts)]
        heapq.heapify(self._ready)
        self._active = 0                # conversations with a turn in flight

    def due(self, now: float) -> list[Submission]:
        out = []
        while self._ready and self._ready[0][0] <= now:
            due, row = heapq.heappop(self._ready)
            c = row // self._turns
            prompt = self._context.get(c, list(self._w.system_prompt))
            prompt = prompt + self._w.prompts[row].tolist()
            self._context[c] = prompt
            out.append(Submission(str(row), prompt,
                                  greedy(int(self._w.trace.output_lens[row])), due))
            self._active += 1
        return out

    def next_due(self) -> float | None:
        return self._ready[0][0] if self._ready else None

    def finished(self, request_id: str, output: RequestOutput | None, now: float) -> None:
        self._active -= 1
        row = int(request_id)
        c, turn = divmod(row, self._turns)
        if output is None or turn + 1 == self._turns:
            self._context.pop(c, None)
            return
        self._context[c] = self._context[c] + list(output.token_ids)
        heapq.heappush(self._ready, (now + float(self._w.think_times[row + 1]), row + 1))

    def exhausted(self) -> bool:
        return not self._ready and not self._active


def greedy(max_tokens: int) -> SamplingParams:
    """A benchmark request's sampling: greedy, to exactly max_tokens (EOS ignored)."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _sent_lens(trace: Trace, turns: int) -> np.ndarray:
    """[N] what each row sends: its own prompt, plus for a conversation's turn k every earlier
    turn's prompt and answer."""
    own = trace.prompt_lens.reshape(-1, turns)
    both = (trace.prompt_lens + trace.output_lens).reshape(-1, turns)
    before = np.cumsum(both, axis=1) - both
    return (before + own).reshape(-1)


def _subset(trace: Trace, keep: np.ndarray) -> Trace:
    arrivals = trace.arrivals
    if arrivals is not None:
        arrivals = arrivals[keep] - arrivals[keep][0]
    return replace(trace, prompt_lens=trace.prompt_lens[keep],
                   output_lens=trace.output_lens[keep], arrivals=arrivals)
