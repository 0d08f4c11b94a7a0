"""What the engine hands back to the caller for each request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter seconds) of one request's life.

    token_times holds the time each output token was produced, so inter-token latency is
    `diff(token_times)` and time to first token is `first_token_time - arrival_time`.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0

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


@dataclass
class RequestOutput:
    """The state of one request after a step: all output tokens so far, and whether it ended.

    finish_reason is None while running, then "length" (max_tokens reached), "stop" (an EOS or
    stop token, which is included in token_ids), "abort", or "error": this request alone could
    not go on (`error` says why); the engine keeps serving the others.

    prompt_token_ids is a tuple and token_ids a copy: changing either changes nothing in the
    engine.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    error: str | None = None
