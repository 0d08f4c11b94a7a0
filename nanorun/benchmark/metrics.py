"""The numbers of one benchmark run, named and computed as `vllm bench serve` does.

Per request: TTFT = first token - arrival; E2EL = last token - arrival; TPOT = (E2EL - TTFT) /
(output tokens - 1), for requests of more than one output token; ITL = every gap between two
consecutive tokens of a request, pooled over all requests. Means, medians, standard deviations
and percentiles (numpy's linear interpolation) are in milliseconds; a statistic of nothing
(e.g. TPOT when every output is one token long) is None, not 0. Throughputs count completed
requests only and divide by the run's duration (first arrival to last completion).

Goodput counts the completed requests that meet every given service-level objective
(`ttft:MS`, `tpot:MS`, `e2el:MS`), a one-token request counting as TPOT 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class RequestResult:
    """What happened to one request; times in seconds. error is "" when it succeeded."""

    prompt_len: int
    output_len: int                          # tokens produced
    ttft: float | None = None
    e2el: float | None = None
    itls: tuple[float, ...] = field(default=())
    error: str = ""
    cached_tokens: int | None = None         # prompt tokens taken from a prefix cache

    @property
    def success(self) -> bool:
        return not self.error

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for a one-token output."""
        if self.output_len < 2 or self.ttft is None or self.e2el is None:
            return None
        return (self.e2el - self.ttft) / (self.output_len - 1)


def parse_goodput(pairs: Sequence[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for pair in pairs:
        name, _, value = pair.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if name not in SLO_METRICS or not ms >= 0:
            raise ValueError(f"goodput objective {pair!r}: use NAME:MS with NAME one of "
                             f"{', '.join(SLO_METRICS)} and MS a non-negative number of "
                             f"milliseconds, e.g. ttft:500 tpot:50")
        slos[name] = ms
    return slos


def compute_metrics(
    results: Sequence[RequestResult],
    duration: float,
    *,
    percentiles: Sequence[float] = (99,),
    goodput: dict[str, float] | None = None,
) -> dict:
    """vLLM's result fields for one run: counts, throughputs, and for each of ttft, tpot, itl,
    e2el its mean/median/std and p<N> in ms. request_goodput is None without objectives."""
    if not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    done = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_len for r in done)
    metrics = {
        "duration": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "request_goodput": (_count_good(done, goodput) / duration) if goodput else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        **prefix_cache_metrics(done),
    }
    samples = {
        "ttft": [r.ttft for r in done],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [gap for r in done for gap in r.itls],
        "e2el": [r.e2el for r in done],
    }
    for name in LATENCY_METRICS:
        metrics.update(latency_stats(name, samples[name], percentiles))
    return metrics


def prefix_cache_metrics(done: Sequence[RequestResult]) -> dict:
    """The prefix cache's share of the prompt tokens of the completed requests: cached tokens
    summed over prompt tokens (vLLM's num_cached_tokens, usage.prompt_tokens_details.
    cached_tokens), and the prompt tokens the engine computed. None where any request's
    cached count is unknown (an engine or server that does not report it)."""
    cached = [r.cached_tokens for r in done]
    if not done or None in cached:
        return {"total_cached_tokens": None, "prefix_cache_hit_rate": None,
                "prompt_tokens_computed": None}
    total_in, total_cached = sum(r.prompt_len for r in done), sum(cached)
    return {"total_cached_tokens": total_cached,
            "prefix_cache_hit_rate": total_cached / total_in if total_in else None,
            "prompt_tokens_computed": total_in - total_cached}


def latency_stats(name: str, seconds: Sequence[float], percentiles: Sequence[float]) -> dict:
    """{mean_<name>_ms, median_<name>_ms, std_<name>_ms, p<P>_<name>_ms...}; None if empty."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    empty = ms.size == 0
    stats = {
        f"mean_{name}_ms": None if empty else float(ms.mean()),
        f"median_{name}_ms": None if empty else float(np.median(ms)),
        f"std_{name}_ms": None if empty else float(ms.std()),
    }
    for p in percentiles:
        stats[f"p{percentile_label(p)}_{name}_ms"] = None if empty else float(np.percentile(ms, p))
    return stats


def percentile_label(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9": the key vLLM writes."""
    return str(int(p)) if int(p) == p else str(p)


def _count_good(done: Sequence[RequestResult], slos: dict[str, float]) -> int:
    def good(r: RequestResult) -> bool:
        observed = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.e2el}
        return all(observed[name] * 1e3 <= ms for name, ms in slos.items())
    return sum(good(r) for r in done)
