"""When each request arrives: all at once, at a Poisson or gamma rate, or at the trace's times.

Offline (rate inf) measures peak throughput: every request is queued at time 0. A finite rate
draws the gaps between requests from a gamma distribution with shape `burstiness` and mean
1 / rate, as `vllm bench serve` does: burstiness 1 is a Poisson process, below 1 burstier,
above 1 more even. The first request arrives at 0 and the gaps are not rescaled, so the mean
rate is the asked one only in expectation. "trace" replays the trace's own timestamps.
"""

from __future__ import annotations

import math

import numpy as np

from .traces import Trace

TRACE_RATE = "trace"

RequestRate = float | str   # requests/s (math.inf: offline) or TRACE_RATE


def parse_request_rate(text: str) -> RequestRate:
    """The command-line form: a positive number of requests/s, "inf" (offline) or "trace"."""
    t = text.strip().lower()
    if t == TRACE_RATE:
        return TRACE_RATE
    try:
        rate = float(t)
    except ValueError:
        rate = math.nan
    if not rate > 0:
        raise ValueError(f"request rate {text!r}: use a positive number of requests/s, 'inf' "
                         f"(all at once) or '{TRACE_RATE}' (the trace's own timestamps)")
    return rate


def gamma_arrivals(num_requests: int, rate: float, *, burstiness: float = 1.0,
                   seed: int = 0) -> np.ndarray:
    """[num_requests] arrival times in seconds, the first at 0; all 0 when rate is inf."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (inf: all at once), got {rate}")
    if not 0 < burstiness < math.inf:
        raise ValueError(f"burstiness must be a positive finite number (1.0: Poisson), "
                         f"got {burstiness}")
    if math.isinf(rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness),
                                             size=max(num_requests - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:num_requests]


def schedule(trace: Trace, rate: RequestRate, *, burstiness: float = 1.0,
             seed: int = 0) -> np.ndarray:
    """Arrival times in seconds for every request of the trace."""
    if rate == TRACE_RATE:
        if trace.arrivals is None:
            raise ValueError(f"trace {trace.name!r} has no timestamps, so it cannot be replayed "
                             f"at its own times; give --request-rate a number or inf")
        return np.asarray(trace.arrivals, dtype=np.float64)
    return gamma_arrivals(len(trace), float(rate), burstiness=burstiness, seed=seed)


def offered_rate(arrivals: np.ndarray) -> float:
    """The mean rate of a schedule in requests/s (inf when everything arrives at once)."""
    span = float(arrivals[-1] - arrivals[0]) if len(arrivals) else 0.0
    return (len(arrivals) - 1) / span if span > 0 else math.inf
