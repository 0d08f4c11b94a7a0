"""Run a trace through the engine under each layout and request rate.

Every layout runs in this process on the same requests (the same prompt token ids, output
lengths and arrival times), one after the other, each in a fresh engine that is freed before
the next is built. "sequential" always runs, first, added when not asked for: the ratio of each
layout's throughput to it is nano-batching's gain, and that is only meaningful measured side by
side. Each engine is warmed up (kernel compilation, first allocations) before it is timed.

Repeats (`repeats=N`) interleave: sequential, A, B, sequential, A, B, ... (not A A B B), so a
drift of the machine (clocks, a neighbour's load) lands on every layout alike, and repeat r of
a layout is paired with repeat r of sequential for its ratio. The device's ceilings are
measured once per run, before any engine, not per layout or repeat. Several traces can share
the engines (run_traces): each (repeat, layout) engine is built once and serves every trace.

The step loop is loop.run_requests, the one every benchmark uses: a request is added once its
arrival time has passed, and its arrival time is the scheduled one, so time spent waiting for
a busy step counts in its TTFT. Outputs run to the trace's length (ignore EOS, greedy). A
request that cannot be added, or ends with any other number of tokens, is recorded as failed
with the reason, and the run goes on; if a step itself raises, the requests in flight and
those not yet sent fail with that reason and the run ends there. The requests come from the
workload (workload.py): a trace's, or conversations whose next turn is sent only after the
previous answer.

Requests that can never fit (prompt + output beyond the model's context or the KV cache) are
skipped before any run, with a warning and a count in the report: they would fail the same way
under every layout and say nothing about throughput.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..config import DEFAULT_MAX_BATCH_TOKENS, EngineConfig
from ..device import device_spec
from ..engine import Engine
from ..engine_builder import choose_layout
from ..layout import Layout
from ..lengths import get_length_predictor, predictor_name
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from ..scheduler import uses_predictions
from . import arrivals as arrival_process
from . import ceilings, environment
from .loop import run_requests
from .metrics import RequestResult, compute_metrics
from .traces import LengthFilter, load_trace
from .workload import Prefixes, Workload, greedy

__all__ = ["BenchConfig", "Drive", "Measurement", "Run", "Workload", "drive", "greedy",
           "run_benchmark", "run_traces"]

logger = logging.getLogger("nanorun")

BASELINE = "sequential"
_WARMUP_PROMPTS, _WARMUP_TOKENS = (40, 7), 4


@dataclass(frozen=True)
class BenchConfig:
    """Everything one `nanorun bench` invocation measures. See `nanorun bench --help`."""

    model: str = "tiny-llama"
    max_batch_tokens: int | None = None     # None: see dense_batch_tokens()
    # Every layout's engine takes these EngineConfig keywords (device, dtype, kv_cache_tokens,
    # scheduling_policy, ...); the layout, the dense batch size and the seed are the bench's.
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    trace: str = "sharegpt"
    num_requests: int | None = 32
    length_filter: LengthFilter | None = None
    layouts: tuple[str, ...] = (BASELINE, "overlap")
    request_rates: tuple[arrival_process.RequestRate, ...] = (math.inf,)
    burstiness: float = 1.0
    goodput: tuple[tuple[str, float], ...] = ()     # (metric, ms) objectives
    percentiles: tuple[float, ...] = (99.0,)
    seed: int = 0                           # the trace window, prompts, arrivals, weights
    show_progress: bool = True
    # Interleaved passes over every layout. 1 here, so that a script's budget stays its own;
    # the command's default is cli.DEFAULT_REPEATS.
    repeats: int = 1
    prefixes: Prefixes = Prefixes()         # a shared system prompt, conversations

    def __post_init__(self) -> None:
        own = {"model", "layout", "max_batch_tokens", "seed"} & set(self.engine_options)
        if own:
            raise ValueError(f"engine_options cannot set {sorted(own)}: BenchConfig's own "
                             f"fields (and layouts) set them for every engine")
        EngineConfig(model=self.model, **self.engine_options)     # validates, names the field
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if not self.layouts:
            raise ValueError("give at least one layout")
        if not self.request_rates:
            raise ValueError("give at least one request rate (inf: all at once)")
        bad = [p for p in self.percentiles if not 0 < p <= 100]
        if bad:
            raise ValueError(f"percentiles must be in (0, 100], got {bad}")

    @property
    def layouts_to_run(self) -> tuple[str, ...]:
        """The asked layouts, deduplicated, with the baseline first."""
        return tuple(dict.fromkeys((BASELINE, *self.layouts)))

    def dense_batch_tokens(self) -> int:
        """One dense batch size for every layout, so that their ratios compare like with like:
        --max-batch-tokens, else the size of the first layout that has its own (a layout
        `nanorun tune` stored for "auto", a layout JSON), else the engine's default."""
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        from ..models import resolve_model
        model_name = resolve_model(self.model)[0].name
        spec = device_spec(torch.device(self.device))
        for layout in self.layouts:
            resolved = choose_layout(layout, model_name, spec)
            if isinstance(resolved, Layout):
                return resolved.batch_tokens
        return DEFAULT_MAX_BATCH_TOKENS

    @property
    def device(self) -> str:
        return self.engine_options.get("device", "cpu")

    def engine(self, layout: str, max_batch_tokens: int) -> Engine:
        return Engine(self.model, layout=layout, max_batch_tokens=max_batch_tokens,
                      seed=self.seed, **self.engine_options)


@dataclass(frozen=True)
class Drive:
    """What one pass of the workload through an engine produced."""

    results: list[RequestResult]     # one per request, in trace order
    duration: float                  # seconds from the start to the last completion
    engine_steps: int
    preemptions: int


@dataclass
class Run:
    """One layout at one request rate; metrics are filled in once every run is done."""

    layout: str                      # as asked ("auto", a JSON file, ...)
    layout_name: str                 # the Layout the engine ran
    request_rate: arrival_process.RequestRate
    offered_rate: float              # the schedule's mean rate, req/s
    drive: Drive
    metrics: dict = field(default_factory=dict)
    repeat: int = 0                  # which interleaved pass (0 .. repeats - 1)


@dataclass(frozen=True)
class Measurement:
    """Everything report.build_report needs."""

    config: BenchConfig
    environment: dict
    measured: ceilings.Ceilings      # this device's GEMM rate and copy bandwidth
    engine_facts: dict
    workload: Workload
    runs: list[Run]


def run_benchmark(config: BenchConfig, *, measured: ceilings.Ceilings | None = None
                  ) -> Measurement:
    """Measure the device (unless `measured` is given), then every layout at every request
    rate, `config.repeats` times interleaved."""
    return run_traces(config, (config.trace,), measured=measured)[0]


def run_traces(config: BenchConfig, traces: tuple[str, ...], *,
               num_requests: tuple[int | None, ...] | None = None,
               measured: ceilings.Ceilings | None = None) -> list[Measurement]:
    """run_benchmark over several traces, one Measurement each, with one measurement of the
    ceilings and one engine per (repeat, layout) serving every trace in turn. num_requests:
    one per trace (default: config.num_requests for each)."""
    options = EngineConfig(model=config.model, **config.engine_options)
    if uses_predictions(options.scheduling_policy, options.kv_reservation):
        # Fit (or fail) once, before anything is built.
        config = replace(config, engine_options={
            **config.engine_options,
            "length_predictor": get_length_predictor(options.length_predictor)})
    counts = num_requests or (config.num_requests,) * len(traces)
    if len(counts) != len(traces):
        raise ValueError(f"{len(traces)} traces but {len(counts)} request counts")
    loaded = [load_trace(name, num_requests=n, seed=config.seed,
                         length_filter=config.length_filter) for name, n in zip(traces, counts)]
    for trace in loaded:
        for rate in config.request_rates:
            # A bad rate or burstiness fails here, before anything is built.
            arrival_process.schedule(trace, rate, burstiness=config.burstiness)
    engine_config = options
    device = engine_config.torch_device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={config.device!r} but torch sees no CUDA device; use "
                           f"--device cpu")
    env = environment.describe(device)
    if measured is None:
        measured = ceilings.measure(device, engine_config.torch_dtype)
    batch_tokens = config.dense_batch_tokens()
    workloads: list[Workload | None] = [None] * len(loaded)
    facts: dict = {}
    runs: list[list[Run]] = [[] for _ in loaded]
    for repeat in range(config.repeats):
        for layout in config.layouts_to_run:
            engine = config.engine(layout, batch_tokens)
            if not facts:
                facts = engine_facts(engine)
            for k, trace in enumerate(loaded):
                if workloads[k] is None:
                    workloads[k] = Workload.fit(trace, engine, config.seed, config.prefixes)
            warm_up(engine)
            for k, workload in enumerate(workloads):
                runs[k] += [_run_one(engine, workload, layout, rate, config, repeat)
                            for rate in config.request_rates]
            del engine
            _free_memory(device)
    goodput = dict(config.goodput) or None
    for run in (r for per_trace in runs for r in per_trace):
        run.metrics = compute_metrics(run.drive.results, run.drive.duration,
                                      percentiles=config.percentiles, goodput=goodput)
    return [Measurement(replace(config, trace=name, num_requests=n), env, measured, facts,
                        workload, per_trace)
            for name, n, workload, per_trace in zip(traces, counts, workloads, runs)]


def warm_up(engine: Engine) -> None:
    """Run two short requests so that compilation and first allocations are not timed."""
    params = SamplingParams(max_tokens=_WARMUP_TOKENS, temperature=0.0, ignore_eos=True)
    for i, n in enumerate(_WARMUP_PROMPTS):
        n = max(1, min(n, engine.max_model_len - _WARMUP_TOKENS))
        engine.add_request(f"warmup-{i}", [1 + (t % 7) for t in range(n)], params)
    while engine.has_unfinished_requests():
        engine.step()


def drive(engine: Engine, workload: Workload, arrivals: np.ndarray, *, progress=None) -> Drive:
    """Run the workload; arrivals: seconds from the start (non-decreasing) of each request, or
    of each conversation's first turn (Workload.starts)."""
    trace, n = workload.trace, len(workload.trace)
    done = run_requests(engine, workload.source(arrivals),
                        on_end=None if progress is None else (lambda _: progress.update(1)))
    results = []
    for i in range(n):
        out, prompt_len = done.outputs.get(str(i)), int(trace.prompt_lens[i])
        error = done.errors.get(str(i)) or done.stopped or (
            "not sent: an earlier turn of its conversation failed")
        results.append(request_result(out, int(trace.output_lens[i])) if out is not None
                       else RequestResult(prompt_len, 0, error=error))
    return Drive(results, done.wall_s, done.steps, done.preemptions)


def request_result(out: RequestOutput, expected_len: int) -> RequestResult:
    """The latencies of a finished request; failed unless it produced exactly expected_len."""
    m, produced = out.metrics, len(out.token_ids)
    prompt_len = len(out.prompt_token_ids)
    if out.finish_reason != "length" or produced != expected_len:
        return RequestResult(prompt_len, produced, error=(
            f"produced {produced} tokens (finish_reason {out.finish_reason!r}), "
            f"expected {expected_len}"))
    itls = tuple(float(g) for g in np.diff(m.token_times))
    return RequestResult(prompt_len, produced, ttft=m.ttft, e2el=m.e2e_latency, itls=itls,
                         cached_tokens=cached_tokens(out))


def cached_tokens(out: RequestOutput) -> int | None:
    """The prompt tokens the engine took from its prefix cache (vLLM's num_cached_tokens)."""
    return out.num_cached_tokens


def engine_facts(engine: Engine) -> dict:
    """The model and engine settings a report records."""
    mc, cfg = engine.model_config, engine.config
    random_weights = cfg.weights == "random" or _is_preset(cfg.model)
    return {
        "model": mc.name,
        "num_active_params_per_token": mc.num_active_params_per_token,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "max_batch_tokens": cfg.max_batch_tokens,
        "scheduling_policy": cfg.scheduling_policy,
        "length_predictor": predictor_name(engine.scheduler.predictor),
        "kv_reservation": cfg.kv_reservation,
        "async_scheduling": cfg.async_scheduling,
        "cpu_threads": torch.get_num_threads(),
        "kv_cache_tokens": engine.kv_cache.capacity_tokens,
        "max_model_len": engine.max_model_len,
        "weights": "random" if random_weights else "loaded",
    }


def _run_one(engine: Engine, workload: Workload, layout: str, rate,
             config: BenchConfig, repeat: int = 0) -> Run:
    arrivals = arrival_process.schedule(workload.starts(), rate,
                                        burstiness=config.burstiness, seed=config.seed)
    desc = f"{layout_label(layout)} @ {rate}" + (f" #{repeat + 1}" if config.repeats > 1 else "")
    progress = _progress(len(workload.trace), desc, config.show_progress)
    # Every run starts from a cold prefix cache: an engine serving several rates or traces
    # would otherwise find the prompts of the run before it (and the warm-up's) cached.
    engine.kv_cache.clear_prefix_cache()
    try:
        done = drive(engine, workload, arrivals, progress=progress)
    finally:
        progress.close()
    return Run(layout, engine.executor.layout_name, rate, arrival_process.offered_rate(arrivals),
               done, repeat=repeat)


def layout_label(layout: str) -> str:
    """A layout as reports name it: a JSON file by its file name, never by its path."""
    return layout.replace("\\", "/").rsplit("/", 1)[-1]


def _is_preset(model: str) -> bool:
    from ..models import PRESETS
    return model in PRESETS


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    # disable=None: tqdm shows the bar only on a terminal.
    return tqdm(total=total, desc=desc, unit="req", disable=None if enabled else True,
                leave=False)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
