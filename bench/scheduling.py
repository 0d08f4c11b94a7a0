"""FCFS against HRRN (Magnus's highest response ratio next) on one trace, side by side.

    python bench/scheduling.py [--model tiny-llama] [--device cpu] [--trace sharegpt]
        [--num-requests 400] [--max-batch-tokens 128] [--kv-cache-tokens 4096]
        [--load 1.0 1.2] [--out bench/results/cpu/scheduling.json]

Two parts, one JSON:

1. How well prompt length predicts output length, on every shipped trace: a
   BucketedLengthPredictor fitted on a seeded half of the trace, scored on the other half
   (mean absolute error, against the half's global median as the baseline, and Spearman's rank
   correlation, which is what a ranking policy needs).
2. The engine under six schedulers on the same requests: "fcfs"; "hrrn" with each request's
   max_tokens (every request runs to its trace length, so that is an oracle: what HRRN gains
   at best); "hrrn" with the prompt-length model fitted on the whole trace (the window run is
   a fraction of a percent of it, so its leak into the fit is negligible), used without its
   cap at max_tokens, since here max_tokens is the answer; and the same three admitting with
   kv_reservation="predicted" (fcfs's reservation with the oracle). A small KV cache makes
   requests queue for pages and preempt each other, which is where admission matters. Two arrival patterns: all
   at once (offline), and Poisson arrivals at each --load times the rate FCFS sustained
   offline (the same seeded gaps, scaled).

Latencies are counted in engine iterations (steps): TTFT is the steps from a request's arrival
to its first token, E2EL to its last, and the longest ITL the most steps between two of its
consecutive tokens (1 unless it stalled: a preempted request stalls while it is recomputed). A policy changes only which request runs when, so steps
are the measure of it that does not depend on the machine: they are deterministic, where
wall-clock on a shared CPU swung 6x between repeats of one run. Under load every iteration is
filled to the same token budget, so on a GPU an iteration takes about the same time whoever is
in it. Wall-clock seconds are recorded too, for what they are worth.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import numpy as np
import torch

from nanorun import Engine
from nanorun.benchmark import environment
from nanorun.benchmark.cli import CPU_FILTER
from nanorun.benchmark.loop import ScheduledSource, StepClock, Submission, run_requests
from nanorun.benchmark.runner import Workload, greedy, warm_up
from nanorun.benchmark.traces import TRACES, load_trace, parse_length_filter
from nanorun.lengths import BucketedLengthPredictor, predictor_name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "environment": environment.describe(torch.device(args.device)),
           "prediction": {name: prediction_quality(name, args.seed) for name in TRACES}}
    for name, q in doc["prediction"].items():
        print(f"{name:>10}: MAE {q['mae_bucketed']:.1f} tokens vs {q['mae_global_median']:.1f} "
              f"for the global median; Spearman {q['spearman_bucketed']:.3f}")
    doc["policies"] = compare_policies(args)
    for pattern, runs in doc["policies"]["patterns"].items():
        print(pattern)
        for name, run in runs.items():
            r = run["ratio_to_fcfs"]
            print(f"  {name:>24}: TTFT mean {run['mean_ttft_steps']:6.1f} steps "
                  f"({r['mean_ttft_steps']:.3f}x), E2EL mean {run['mean_e2el_steps']:6.1f} "
                  f"({r['mean_e2el_steps']:.3f}x) p99 {run['p99_e2el_steps']:6.1f} "
                  f"({r['p99_e2el_steps']:.3f}x), longest ITL p99 "
                  f"{run['p99_longest_itl_steps']:5.1f}, {run['steps']} steps, "
                  f"{run['preemptions']} preemptions")
    if args.out:
        environment.write_result(doc, args.out, indent=2)
        print(f"wrote {args.out}")
    return 0


def prediction_quality(trace: str, seed: int) -> dict:
    t = load_trace(trace)
    order = np.random.default_rng(seed).permutation(len(t))
    train, test = order[: len(t) // 2], order[len(t) // 2:]
    model = BucketedLengthPredictor.fit(t.prompt_lens[train], t.output_lens[train])
    actual = t.output_lens[test].astype(np.float64)
    predicted = np.array([model.median_for(int(n)) for n in t.prompt_lens[test]])
    baseline = np.median(t.output_lens[train])
    return {"requests": len(t), "source": t.source, "buckets": len(model.medians),
            "mae_bucketed": float(np.abs(predicted - actual).mean()),
            "mae_global_median": float(np.abs(baseline - actual).mean()),
            "spearman_bucketed": spearman(predicted, actual),
            "spearman_prompt_len": spearman(t.prompt_lens[test], actual)}


def spearman(a, b) -> float:
    """Spearman's rank correlation, ties given their average rank."""
    return float(np.corrcoef(_ranks(np.asarray(a)), _ranks(np.asarray(b)))[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - (counts - 1) / 2.0) - 1)[inverse]


class PromptLengthOnly:
    """A fitted BucketedLengthPredictor without the cap at max_tokens: here each request's
    max_tokens is its true output length, so the cap would hand over the answer."""

    def __init__(self, model: BucketedLengthPredictor) -> None:
        self.model = model
        self.name = f"{model.name}, uncapped"

    def predict(self, prompt_token_ids, sampling_params) -> float:
        return self.model.median_for(len(prompt_token_ids))


def compare_policies(args) -> dict:
    trace = load_trace(args.trace, num_requests=args.num_requests, seed=args.seed,
                       length_filter=parse_length_filter(args.filter))
    fitted = PromptLengthOnly(BucketedLengthPredictor.from_trace(args.trace))
    setups = {   # name: (scheduling_policy, length_predictor, kv_reservation)
        "fcfs": ("fcfs", None, "none"),
        "hrrn:max_tokens": ("hrrn", "max_tokens", "none"),
        f"hrrn:{args.trace}": ("hrrn", fitted, "none"),
        "fcfs+reserve:max_tokens": ("fcfs", "max_tokens", "predicted"),
        "hrrn+reserve:max_tokens": ("hrrn", "max_tokens", "predicted"),
        f"hrrn+reserve:{args.trace}": ("hrrn", fitted, "predicted"),
    }
    engines = {}
    for name, (policy, predictor, reservation) in setups.items():
        engines[name] = Engine(args.model, device=args.device, weights="random",
                               max_batch_tokens=args.max_batch_tokens,
                               kv_cache_tokens=args.kv_cache_tokens, seed=args.seed,
                               scheduling_policy=policy, length_predictor=predictor,
                               kv_reservation=reservation)
        warm_up(engines[name])
    workload = Workload.fit(trace, engines["fcfs"], args.seed)
    n = len(workload.trace)
    offline = np.zeros(n, dtype=np.int64)
    results = {"offline": {name: run_in_steps(e, workload, offline)
                           for name, e in engines.items()}}
    capacity = n / results["offline"]["fcfs"]["steps"]       # requests per step, offline
    unit_gaps = np.random.default_rng(args.seed).exponential(1.0, n)
    for load in args.load:
        gaps = unit_gaps / (load * capacity)
        poisson = np.floor(np.cumsum(gaps) - gaps[0]).astype(np.int64)
        results[f"poisson, load {load}"] = {name: run_in_steps(e, workload, poisson)
                                            for name, e in engines.items()}
    for pattern, runs in results.items():
        for name, run in runs.items():
            run["ratio_to_fcfs"] = {k: run[k] / runs["fcfs"][k]
                                    for k in STEP_METRICS if runs["fcfs"][k]}
    return {"model": args.model, "device": args.device, "trace": workload.trace.name,
            "trace_source": workload.trace.source, "num_requests": n,
            "length_filter": args.filter, "max_batch_tokens": args.max_batch_tokens,
            "kv_cache_tokens": args.kv_cache_tokens,
            "offline_fcfs_requests_per_step": capacity,
            "setups": {name: {"scheduling_policy": e.scheduler.policy,
                              "length_predictor": predictor_name(e.scheduler.predictor),
                              "kv_reservation": e.scheduler.kv_reservation}
                       for name, e in engines.items()},
            "patterns": results}


STEP_METRICS = ("mean_ttft_steps", "median_ttft_steps", "p99_ttft_steps", "mean_e2el_steps",
                "median_e2el_steps", "p99_e2el_steps", "mean_longest_itl_steps",
                "p99_longest_itl_steps", "steps")


def run_in_steps(engine: Engine, workload: Workload, arrival_steps: np.ndarray) -> dict:
    """Add request i before step arrival_steps[i] (or as soon as the engine is idle and it is
    next); run every request to its trace length; latencies in steps."""
    trace, n = workload.trace, len(workload.trace)
    first, last, arrived = np.zeros(n), np.zeros(n), np.zeros(n)
    longest_gap = np.zeros(n)      # most steps between two consecutive tokens: a stall
    clock = StepClock()

    class Arrivals(ScheduledSource):
        def due(self, now: float) -> list[Submission]:
            subs = super().due(now)
            for sub in subs:
                arrived[int(sub.request_id)] = now
            return subs

    def seen(out) -> None:
        i, step = int(out.request_id), clock.step
        if len(out.token_ids) == 1 and not first[i]:
            first[i] = step
        elif len(out.token_ids) > 1:
            longest_gap[i] = max(longest_gap[i], step - last[i])
        last[i] = step

    done = run_requests(engine, Arrivals([
        Submission(str(i), workload.prompts[i].tolist(), greedy(int(trace.output_lens[i])),
                   float(arrival_steps[i])) for i in range(n)]), on_output=seen, clock=clock)
    if done.errors or len(done.outputs) != n:
        raise RuntimeError(f"requests failed: {done.errors}")
    for rid, out in done.outputs.items():
        if len(out.token_ids) != trace.output_lens[int(rid)]:
            raise RuntimeError(f"request {rid} produced {len(out.token_ids)} tokens, "
                               f"expected {trace.output_lens[int(rid)]}")
    ttft, e2el = first - arrived, last - arrived
    return {"steps": clock.step, "preemptions": done.preemptions,
            "wall_seconds": done.wall_s,
            "mean_ttft_steps": float(ttft.mean()), "median_ttft_steps": float(np.median(ttft)),
            "p99_ttft_steps": float(np.percentile(ttft, 99)),
            "mean_e2el_steps": float(e2el.mean()), "median_e2el_steps": float(np.median(e2el)),
            "p99_e2el_steps": float(np.percentile(e2el, 99)),
            "mean_longest_itl_steps": float(longest_gap.mean()),
            "p99_longest_itl_steps": float(np.percentile(longest_gap, 99))}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trace", default="sharegpt", choices=list(TRACES))
    p.add_argument("--filter", default=CPU_FILTER)
    p.add_argument("--num-requests", type=int, default=400)
    p.add_argument("--max-batch-tokens", type=int, default=128)
    p.add_argument("--kv-cache-tokens", type=int, default=4096)
    p.add_argument("--load", type=float, nargs="+", default=[1.0, 1.2],
                   help="Poisson arrival rates, as fractions of the request rate FCFS "
                        "sustained offline (default: 1.0 1.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
