"""/metrics: Prometheus metrics, under vLLM's names where vLLM has one.

Names that vLLM's dashboards and autoscalers read keep vLLM's `vllm:` prefix and meaning, so a
Grafana board or a KEDA rule built for vLLM works unchanged on nanorun; what vLLM has no metric
for is `nanorun:`. Every metric carries the `model_name` label, as vLLM's do. One registry per
server (not prometheus_client's global one), so several apps in a process do not collide.

Gauges are set from the engine loop's latest stats when /metrics is scraped; histograms and
counters are fed on the event loop as each step's outputs arrive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .async_engine import EngineStats

# vLLM's buckets (seconds), so that histograms compare bucket for bucket.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
REQUEST_TIME_BUCKETS = E2E_BUCKETS      # vLLM's request_latency_buckets, for the phases too
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's build_1_2_5_buckets)."""
    out, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_value:
                return tuple(out)
            out.append(value)
        exponent += 1

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """The server's Prometheus registry and how outputs feed it."""

    def __init__(self, model_name: str, max_model_len: int = 1 << 20,
                 cache_info: Mapping[str, Any] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, labels = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc",
                              "KV cache usage: 1 means every page is in use.")
        self.kv_pages = gauge("nanorun:kv_cache_pages", "KV cache pages in all.")
        self.kv_free = gauge("nanorun:kv_cache_free_pages", "KV cache pages free.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of ended requests.")
        self.generation_tokens = counter("vllm:generation_tokens", "Output tokens generated.")
        self.preemptions = counter("vllm:num_preemptions", "Preemptions of ended requests.")
        self.recomputed = counter("nanorun:recomputed_tokens",
                                  "Prompt and context tokens of ended requests computed again "
                                  "after a preemption had freed their KV.")
        self.rejected = counter("nanorun:requests_rejected",
                                "Requests answered 503: past --max-queued-requests.")
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Time to first token (arrival to first output token).", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Time between consecutive output tokens of a request.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Arrival to the end of a request.", E2E_BUCKETS)
        self._success = Counter("vllm:request_success", "Requests ended, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._tokens_seen: dict[str, int] = {}     # event loop only
        lengths = buckets_1_2_5(max_model_len)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.",
                                          ITERATION_TOKEN_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens",
                                               "Number of prefill tokens processed.", lengths)
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", lengths)
        self.params_n = histogram("vllm:request_params_n",
                                  "Histogram of the n request parameter.", N_BUCKETS)
        self.params_max_tokens = histogram("vllm:request_params_max_tokens",
                                           "Histogram of the max_tokens request parameter.",
                                           lengths)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.",
                                    REQUEST_TIME_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.",
                                        REQUEST_TIME_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.",
                                      REQUEST_TIME_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.",
                                     REQUEST_TIME_BUCKETS)
        # Tokens, as vLLM counts them: cumulative in the engine's stats, added here by
        # difference (a counter only goes up).
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried "
                                      "tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits",
                                   "Prefix cache hits, in terms of number of cached tokens.")
        # The host tier's pair (vLLM's names for a prefix cache beyond the device's).
        self.host_queries = counter("vllm:external_prefix_cache_queries",
                                    "External prefix cache queries from KV connector "
                                    "cross-instance cache sharing, in terms of number of "
                                    "queried tokens (nanorun: the host tier).")
        self.host_hits = counter("vllm:external_prefix_cache_hits",
                                 "External prefix cache hits from KV connector cross-instance "
                                 "cache sharing, in terms of number of cached tokens "
                                 "(nanorun: the host tier).")
        self._seen: dict[str, int] = {}
        info = {k: str(v) for k, v in (cache_info or {}).items()}
        Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
              ["model_name", *info], registry=r).labels(model_name, *info.values()).set(1)

    def observe_params(self, params: Sequence[Any]) -> None:
        """A request's parameters, when it is added (one SamplingParams per prompt)."""
        for sp in params:
            self.params_n.observe(sp.n)
            self.params_max_tokens.observe(sp.max_tokens)

    def observe_stats(self, stats: EngineStats) -> None:
        """What an engine message's stats add: its iterations' token counts, the prefix
        cache's queries and hits."""
        for tokens in stats.iteration_tokens:
            self.iteration_tokens.observe(tokens)
        for key, counter, total in (
                ("queries", self.prefix_queries, stats.prefix_cache_queries),
                ("hits", self.prefix_hits, stats.prefix_cache_hits),
                ("host_queries", self.host_queries, stats.host_cache_queries),
                ("host_hits", self.host_hits, stats.host_cache_hits)):
            seen = self._seen.get(key, 0)
            if total > seen:
                counter.inc(total - seen)
            self._seen[key] = max(seen, total)

    def observe(self, outputs: Sequence[Any]) -> None:
        """Count one step's outputs (on the event loop, as they arrive)."""
        new = 0
        for out in outputs:
            produced = sum(len(c.token_ids) for c in out.outputs)
            new += produced - self._tokens_seen.get(out.request_id, 0)
            if not out.finished:
                self._tokens_seen[out.request_id] = produced
                continue
            self._tokens_seen.pop(out.request_id, None)
            self._finished(out)
        if new:             # one increment a step (each takes the counter's lock)
            self.generation_tokens.inc(new)

    def _finished(self, out: Any) -> None:
        m = out.metrics
        self.prompt_tokens.inc(len(out.prompt_token_ids or ()))
        self.preemptions.inc(m.num_preemptions)
        self.recomputed.inc(getattr(m, "num_recomputed_tokens", 0))
        reason = next((c.finish_reason for c in out.outputs if c.finish_reason), "abort")
        self._success.labels(self.model_name, reason).inc()
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
        times = m.token_times
        for a, b in zip(times, times[1:]):
            self.itl.observe(b - a)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        self.request_prompt_tokens.observe(len(out.prompt_token_ids or ()))
        self.request_generation_tokens.observe(sum(len(c.token_ids) for c in out.outputs))
        self._phases(m)

    def _phases(self, m: Any) -> None:
        """vLLM's request phases: waiting (arrival to first scheduled), prefill (to the first
        token), decode (first to last token), inference (scheduled to last token)."""
        scheduled, first = m.first_scheduled_time, m.first_token_time
        if scheduled is None:
            return                  # aborted while waiting: vLLM records no phases either
        self.queue_time.observe(scheduled - m.arrival_time)
        if first is None:
            return
        last = m.token_times[-1] if m.token_times else first
        self.prefill_time.observe(first - scheduled)
        self.decode_time.observe(last - first)
        self.inference_time.observe(last - scheduled)

    def render(self, stats: EngineStats) -> bytes:
        """The exposition text, with the gauges set from the latest engine stats."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_pages.set(stats.num_pages)
        self.kv_free.set(stats.num_free_pages)
        used = stats.num_pages - stats.num_free_pages
        self.kv_usage.set(used / stats.num_pages if stats.num_pages else 0.0)
        return generate_latest(self.registry)
