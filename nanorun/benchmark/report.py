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
object adds `repeats`: every pass's total_token_throughput, mean_ttft_ms, mean_tpot_ms and
ratio to sequential (pass r against sequential's pass r, run next to it) with their min /
median / max. throughput_ratio_to_sequential is then the median of the paired ratios.

Whether the passes resolve that ratio from 1.0 is `repeats.ratio_resolved` (see
ratio_resolved), and the header's `warnings` says in words every row where they do not, or
that one pass gave no spread at all; the summary and the figure print the same list.
"""

from __future__ import annotations

import math
import statistics

from .ceilings import optimal_tokens_per_s
from .runner import BASELINE, Measurement, Run, layout_label

REPORT_VERSION = 1
# The figures whose spread over the passes a run records (and the figure draws as whiskers).
SPREAD_KEYS = ("total_token_throughput", "mean_ttft_ms", "mean_tpot_ms",
               "prefix_cache_hit_rate", "prompt_tokens_computed")


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
    runs = [_run_dict(runs, m, header, bound, baseline) for runs in groups.values()]
    header["warnings"] = spread_warnings(runs, m.config.repeats)
    return {"nanorun": header, "runs": runs}


def ratio_resolved(ratios: list[float]) -> bool | None:
    """Whether interleaved passes resolve a layout's throughput ratio to sequential from 1.0:
    True when the min-max range of the pass-by-pass ratios is no wider than the distance of
    their median from 1.0; None with fewer than two passes (no spread known).

    Resolved, every pass then lies on the median's side of 1.0 and the gap is at least the
    noise: a 1.10x needs its passes within 0.10x of each other. A range rather than a standard
    error because a bench runs 2 to 5 passes, too few to estimate one, and the range is what
    the summary shows; one disturbed pass (a neighbour's job: 3.53x in one pass, 0.79x in the
    next) widens it at once. A layout that truly matches sequential is never resolved: the
    warning then says, rightly, that no difference was shown.
    """
    if len(ratios) < 2:
        return None
    return max(ratios) - min(ratios) <= abs(statistics.median(ratios) - 1.0)


def spread_warnings(runs: list[dict], repeats: int) -> list[str]:
    """The report's `warnings`: one pass only, or each row whose ratio is not resolved."""
    if repeats < 2:
        return ["only one pass (--repeats 1): the spread over passes is unknown, so no ratio "
                "to sequential here is shown to differ from 1.00x by more than noise; use "
                "--repeats 3 or more"]
    warnings = []
    for run in runs:
        rep = run["nanorun"]["repeats"]
        if rep["ratio_resolved"] is False:
            r = rep["ratio_to_sequential"]
            warnings.append(
                f"{run['nanorun']['layout']} at rate {run['request_rate']}: its ratio to "
                f"sequential ranged {r['min']:.2f}-{r['max']:.2f}x over {rep['n']} passes, a "
                f"spread of {r['max'] - r['min']:.2f}x, wider than the "
                f"{abs(r['median'] - 1):.2f}x its median {r['median']:.2f}x lies from 1.00x: "
                f"the difference from sequential is not resolved (rerun with more --repeats "
                f"or on a quieter machine)")
    return warnings


def spread(values: list[float]) -> dict:
    """min / median / max of some passes' figures, and the figures in pass order."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "values": list(values)}


def _spread_of(runs: list[Run], key: str) -> dict | None:
    values = [r.metrics[key] for r in runs]
    return None if None in values else spread(values)


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
        "prefixes": config.prefixes.describe(),
        "num_conversations": m.workload.num_conversations,
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
    repeats = {"n": len(runs),
               **{key: _spread_of(runs, key) for key in SPREAD_KEYS},
               "ratio_to_sequential": spread(known) if known else None,
               "ratio_resolved": None if run.layout == BASELINE else ratio_resolved(known)}
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
