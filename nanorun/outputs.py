"""What the engine hands back to the caller for each request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter seconds) of one request's life.

    token_times holds the time each output token was produced, so inter-token latency is
    `diff(token_times)` and time to first token is `first_token_time - arrival_time`.
    num_preemptions counts the times its KV pages were taken back; num_recomputed_tokens the
    tokens whose KV it then had to compute again.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    # Tokens whose KV was computed again because a preemption had freed it.
    num_recomputed_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability: `rank` 1 is the most likely token (1 + the number of
    tokens with a strictly larger logprob); decoded_token is its text alone (None without a
    tokenizer)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One output sequence of a request (vLLM's CompletionOutput).

    text is the cumulative output text (empty from the token-level Engine, which has no
    tokenizer); token_ids every output token so far. logprobs, when asked for, holds one
    {token_id: Logprob} per output token: the sampled token and the top `logprobs` tokens.
    cumulative_logprob is the sum of the sampled tokens' logprobs (None unless logprobs was
    asked for). finish_reason is None while running, then "stop" (EOS, a stop token, which is
    in token_ids, or a stop string), "length" (max_tokens), "abort", or "error" (`error` says
    why: this sequence alone could not go on). stop_reason is the stop string or stop token id
    that ended it (None for EOS and every other reason).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after a step (vLLM's RequestOutput): its n output sequences
    in `outputs` (outputs[i].index == i), finished once all of them are.

    prompt is the prompt text (None when it was given as token ids); prompt_token_ids a tuple,
    so changing it changes nothing in the engine. prompt_logprobs, when asked for, has one
    entry per prompt token: None for the first, then {token_id: Logprob} with that token and
    the top `prompt_logprobs` tokens.

    token_ids, finish_reason and error are outputs[0]'s, for the usual n = 1 (each a copy).
    num_cached_tokens: the prompt tokens whose KV came from the prefix cache instead of being
    computed, when the request was first scheduled (vLLM's; None before that).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None

    def __post_init__(self) -> None:
        self.prompt_token_ids = tuple(self.prompt_token_ids)
        self.outputs = list(self.outputs)

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def error(self) -> str | None:
        return self.outputs[0].error
