"""The JSON report of `nanorun bench`.

    {"nanorun": {what was measured, on what, and the device's ceilings},
     "runs": [one result per (layout, request rate), each shaped like `vllm bench serve`'s]}

Each run holds vLLM's fields (duration, completed, failed, total_input_tokens, ...,
mean/median/std/p<N> of ttft, tpot, itl and e2el in ms, and the per-request input_lens,
output_lens, ttfts, latencies, errors; per-token ITLs are left out for size) and its own
`nanorun` object: the layout, the offered rate, percent_of_optimal (total_token_throughput
as a percentage of the bound) and throughput_ratio_to_sequential at the same rate.
JSON has no infinity, so an offline rate is written "inf", as vLLM does.

With repeats (N interleaved passes), a run's vLLM fields are those of its median pass (by
total_token_throughput; the lower of the two middle ones when N is even), and its `nanorun`
object adds `repeats`: every pass's total_token_throughput and ratio to sequential (pass r
against sequential's pass r, run next to it) with their min / median / max.
throughput_ratio_to_sequential is then the median of the paired ratios.
"""

from __future__ import annotations

import math
import statistics

from .ceilings import optimal_tokens_per_s
from .runner import BASELINE, Measurement, Run, layout_label

REPORT_VERSION = 1


def build_report(m: Measurement) -> dict:
    """The report as JSON-ready values (no NaN, no infinity, no path of this machine)."""
    bound = optimal_tokens_per_s(m.measured.gemm_tflops,
                                 m.engine_facts["num_active_params_per_token"])
    header = _header(m, bound)
    groups: dict[tuple, list[Run]] = {}
    for run in m.runs:
        groups.setdefault((run.layout, json_rate(run.request_rate)), []).append(run)
    baseline = {(json_rate(r.request_rate), r.repeat): r.metrics["total_token_throughput"]
                for r in m.runs if r.layout == BASELINE}
    return {"nanorun": header,
            "runs": [_run_dict(runs, m, header, bound, baseline) for runs in groups.values()]}


def spread(values: list[float]) -> dict:
    """min / median / max of some passes' figures, and the figures in pass order."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "values": list(values)}


def json_rate(rate):
    """A request rate as JSON can hold it: "inf" for an offline run, "trace", or req/s."""
    return "inf" if isinstance(rate, float) and math.isinf(rate) else rate


def _header(m: Measurement, bound: float) -> dict:
    config, trace = m.config, m.workload.trace
    return {
        "report_version": REPORT_VERSION,
        **m.environment,
        **m.engine_facts,
        "layouts": [layout_label(layout) for layout in config.layouts_to_run],
        "request_rates": [json_rate(r) for r in config.request_rates],
        "burstiness": config.burstiness,
        "trace": trace.name,
        "trace_source": trace.source,
        "length_filter": str(config.length_filter) if config.length_filter else None,
        "num_requests": len(trace),
        "num_skipped": m.workload.num_skipped,
        "skip_reason": m.workload.skip_reason or None,
        "mean_prompt_len": float(trace.prompt_lens.mean()),
        "mean_output_len": float(trace.output_lens.mean()),
        "seed": config.seed,
        "repeats": config.repeats,
        "goodput_slo_ms": dict(config.goodput) or None,
        "gemm_tflops": m.measured.gemm_tflops,
        "gemm_dtype": m.measured.gemm_dtype,
        "gemm_size": m.measured.gemm_size,
        "copy_gbps": m.measured.copy_gbps,
        "optimal_tokens_per_s": bound,
        "ceilings_measured_on": m.environment["device_type"],
    }


def _run_dict(runs: list[Run], m: Measurement, header: dict, bound: float,
              baseline: dict) -> dict:
    rate = json_rate(runs[0].request_rate)
    throughputs = [r.metrics["total_token_throughput"] for r in runs]
    ratios = [t / baseline[(rate, r.repeat)] if baseline.get((rate, r.repeat)) else None
              for t, r in zip(throughputs, runs)]
    run = runs[throughputs.index(statistics.median_low(throughputs))]
    results, throughput = run.drive.results, run.metrics["total_token_throughput"]
    known = [x for x in ratios if x is not None]
    repeats = {"n": len(runs), "total_token_throughput": spread(throughputs),
               "ratio_to_sequential": spread(known) if known else None}
    return {
        "date": header["date"],
        "backend": "nanorun",
        "model_id": header["model"],
        "num_prompts": len(results),
        "request_rate": rate,
        "burstiness": m.config.burstiness,
        "max_concurrency": None,
        **run.metrics,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_len for r in results],
        "ttfts": [r.ttft for r in results],
        "latencies": [r.e2el for r in results],
        "errors": [r.error for r in results],
        "nanorun": {
            "layout": layout_label(run.layout),
            "layout_name": run.layout_name,
            "offered_rate": json_rate(run.offered_rate),
            "engine_steps": run.drive.engine_steps,
            "preemptions": run.drive.preemptions,
            "percent_of_optimal": 100.0 * throughput / bound,
            "throughput_ratio_to_sequential": statistics.median(known) if known else None,
            "repeats": repeats,
        },
    }
