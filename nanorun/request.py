"""A request's mutable state inside the engine."""

from __future__ import annotations

import enum

from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams


# token_at()'s stand-in for a token sampled on the device and not yet read back.
PENDING = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"        # not admitted, or preempted (its KV pages were freed)
    RUNNING = "running"        # holds KV pages: prefilling in chunks, or decoding
    FINISHED = "finished"


class Request:
    """One request: its tokens, its KV pages and how far its KV cache has been computed.

    Prefill and decode are the same thing here: each iteration computes the KV of tokens
    `[num_computed_tokens, num_computed_tokens + n)` of `all_token_ids`; when that chunk reaches
    the last known token, its logits sample the next one. A decode step is a chunk of 1, and a
    preempted request simply starts again from num_computed_tokens = 0 with its outputs so far
    folded into what it recomputes.

    Under async scheduling (see Engine) a token may be sampled on the device but not yet read
    back: num_pending counts those (0 or 1 when the next iteration is formed). They count in
    num_tokens, so the scheduler reserves their KV and schedules the chunk that consumes them;
    token_at() gives PENDING for them, and the batch reads them from the device instead.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: tuple[int, ...],
        sampling_params: SamplingParams,
        arrival_time: float,
        eos_token_ids: tuple[int, ...],
        sampling_key: int = 0,
    ) -> None:
        self.request_id = request_id
        # A tuple: outputs hand it out as it is, and a caller appending to it cannot change
        # what the engine computes.
        self.prompt_token_ids = tuple(prompt_token_ids)
        self.sampling_params = sampling_params
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        # How far its KV had been computed when it was last preempted: computing those
        # tokens again is recompute (metrics.num_recomputed_tokens).
        self.num_computed_before_preemption = 0
        self.num_pending = 0                 # sampled, not yet read back (async scheduling)
        self.pages: list[int] = []
        # Prefix caching (nanorun.prefix_cache): what salts its pages' names (vLLM's
        # cache_salt), the names of its full pages (known once, the tokens never change), how
        # many of its pages are named in the cache, and the prompt tokens it found cached when
        # first admitted (vLLM's num_cached_tokens; None before).
        self.cache_salt: str | None = None
        self.block_hashes: list[bytes] = []
        self.num_pages_cached = 0
        self.num_cached_tokens: int | None = None
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None       # why, when finish_reason is "error"
        self.stop_reason: int | None = None  # the stop_token_ids entry it ended on
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        sp = sampling_params
        self._eos_ids = frozenset() if sp.ignore_eos else frozenset(eos_token_ids)
        self.stop_ids = frozenset(sp.stop_token_ids) | self._eos_ids
        # What the sampler's random numbers are keyed by, with the output position (see
        # nanorun.sampler): the seed, or for unseeded requests one the engine hands out.
        self.sampling_key = sampling_key
        self.logprobs: list[dict[int, Logprob]] | None = (
            None if sp.logprobs is None else [])
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            None if sp.prompt_logprobs is None else [None])

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        """Output tokens sampled so far, read back or not: the position of the next draw."""
        return len(self.output_token_ids) + self.num_pending

    @property
    def sampling_done(self) -> bool:
        """max_tokens tokens are sampled: nothing is left to schedule, whatever they are (the
        last may still be in flight; a stop token is only seen when it is read back)."""
        return self.num_output_tokens >= self.sampling_params.max_tokens

    @property
    def num_remaining(self) -> int:
        """Tokens whose KV still has to be computed before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        return self.num_remaining == 1 and self.num_tokens > len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def advance(self, n: int) -> None:
        """The KV of its next n tokens is being computed (an iteration was launched)."""
        start, self.num_computed_tokens = self.num_computed_tokens, self.num_computed_tokens + n
        again = min(self.num_computed_tokens, self.num_computed_before_preemption) - start
        if again > 0:
            self.metrics.num_recomputed_tokens += again

    def token_at(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + outputs; PENDING for those not yet read back."""
        n_prompt = len(self.prompt_token_ids)
        known = n_prompt + len(self.output_token_ids)
        if end > known:
            return self.token_at(start, known) + [PENDING] * (end - max(start, known))
        if end <= n_prompt:
            return list(self.prompt_token_ids[start:end])
        if start >= n_prompt:              # decode: no copy of the whole sequence per step
            return self.output_token_ids[start - n_prompt:end - n_prompt]
        return list(self.prompt_token_ids[start:]) + self.output_token_ids[:end - n_prompt]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether prompt logprobs are still to be computed."""
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The EOS ids that end this request (none with ignore_eos)."""
        return tuple(sorted(self._eos_ids))

    @property
    def stops_allowed(self) -> bool:
        """min_tokens reached: EOS and stop ids may be drawn as the next token sampled."""
        return self.num_output_tokens >= self.sampling_params.min_tokens

    def append_token(self, token_id: int, now: float,
                     logprobs: dict[int, Logprob] | None = None) -> None:
        """Read back the next output token (sampled num_pending tokens ago, if any)."""
        stops_allowed = len(self.output_token_ids) >= self.sampling_params.min_tokens
        self.output_token_ids.append(token_id)
        self.metrics.token_times.append(now)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id].logprob
        if stops_allowed and token_id in self.stop_ids:
            if token_id not in self._eos_ids:
                self.stop_reason = token_id
            self.finish("stop", now)
        elif len(self.output_token_ids) >= self.sampling_params.max_tokens:
            self.finish("length", now)

    def finish(self, reason: str, now: float, error: str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.metrics.finished_time = now

    def to_output(self) -> RequestOutput:
        """This request as the token-level Engine reports it: no text; copies of its lists."""
        completion = CompletionOutput(
            index=0, text="", token_ids=list(self.output_token_ids),
            cumulative_logprob=None if self.logprobs is None else self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            finish_reason=self.finish_reason, stop_reason=self.stop_reason, error=self.error)
        # Complete by the first output: outputs come with sampled tokens, after the whole
        # prompt (partial only for a request aborted while its prompt was being computed).
        prompt_logprobs = self.prompt_logprobs
        return RequestOutput(
            request_id=self.request_id, prompt=None, prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=None if prompt_logprobs is None else list(prompt_logprobs),
            outputs=[completion], finished=self.finished, metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens)
