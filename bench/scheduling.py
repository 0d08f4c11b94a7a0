"""FCFS against HRRN (Magnus's highest response ratio next) on one trace, side by side.

    python bench/scheduling.py [--model tiny-llama] [--device cpu] [--trace sharegpt]
        [--num-requests 160] [--max-batch-tokens 128] [--kv-cache-tokens 4096]
        [--repeats 3] [--out bench/results/cpu/scheduling.json]

Two parts, one JSON:

1. How well prompt length predicts output length, on every shipped trace: a
   BucketedLengthPredictor fitted on a seeded half of the trace, scored on the other half
   (mean absolute error, against the half's global median as the baseline, and Spearman's rank
   correlation, which is what a ranking policy needs).
2. The engine under three schedulers on the same requests: "fcfs"; "hrrn" with each request's
   max_tokens (the harness runs every request to its trace length, so that is an oracle: what
   HRRN gains at best); and "hrrn" with the prompt-length model fitted on the whole trace (the
   window run is 0.3 % of ShareGPT, so its leak into the fit is negligible). Every engine is
   built and warmed up first; then each repeat runs the three one after the other, and the
   report takes per-metric medians over repeats and their ratios to fcfs. A small KV cache
   makes requests queue for pages, which is where the order of admission matters.

The latencies are wall-clock on whatever device ran it; on a CPU only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

import numpy as np

from nanorun.benchmark import environment
from nanorun.benchmark.cli import CPU_FILTER
from nanorun.benchmark.metrics import compute_metrics
from nanorun.benchmark.runner import BASELINE, BenchConfig, Workload, drive, warm_up
from nanorun.benchmark.traces import TRACES, load_trace, parse_length_filter
from nanorun.lengths import BucketedLengthPredictor

METRICS = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_e2el_ms", "median_e2el_ms",
           "p99_e2el_ms", "mean_tpot_ms", "total_token_throughput", "request_throughput")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "environment": environment.describe(_torch_device(args.device)),
           "prediction": {name: prediction_quality(name, args.seed) for name in TRACES}}
    for name, q in doc["prediction"].items():
        print(f"{name:>10}: MAE {q['mae_bucketed']:.1f} tokens vs {q['mae_global_median']:.1f} "
              f"for the global median; Spearman {q['spearman_bucketed']:.3f}")
    doc["policies"] = compare_policies(args)
    for name, row in doc["policies"]["medians"].items():
        ratio = doc["policies"]["ratio_to_fcfs"][name]
        print(f"{name:>16}: mean TTFT {row['mean_ttft_ms']:8.1f} ms ({ratio['mean_ttft_ms']:.3f}x)"
              f", mean E2EL {row['mean_e2el_ms']:8.1f} ms ({ratio['mean_e2el_ms']:.3f}x), "
              f"p99 E2EL {ratio['p99_e2el_ms']:.3f}x, tok/s "
              f"{ratio['total_token_throughput']:.3f}x")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, allow_nan=False)
            f.write("\n")
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


def compare_policies(args) -> dict:
    base = BenchConfig(model=args.model, device=args.device, weights="random",
                       max_batch_tokens=args.max_batch_tokens,
                       kv_cache_tokens=args.kv_cache_tokens, trace=args.trace,
                       num_requests=args.num_requests,
                       length_filter=parse_length_filter(args.filter), layouts=(BASELINE,),
                       seed=args.seed, show_progress=False)
    setups = {"fcfs": ("fcfs", None), "hrrn:max_tokens": ("hrrn", "max_tokens"),
              f"hrrn:{args.trace}": ("hrrn", args.trace)}
    engines = {}
    for name, (policy, predictor) in setups.items():
        config = BenchConfig(**{**base.__dict__, "scheduling_policy": policy,
                                "length_predictor": predictor})
        engines[name] = config.engine(BASELINE, args.max_batch_tokens)
        warm_up(engines[name])
    trace = load_trace(args.trace, num_requests=args.num_requests, seed=args.seed,
                       length_filter=base.length_filter)
    workload = Workload.fit(trace, engines["fcfs"], args.seed)
    arrivals = np.zeros(len(workload.trace))            # offline: all at once
    runs = {name: [] for name in setups}
    for repeat in range(args.repeats):
        for name, engine in engines.items():
            done = drive(engine, workload, arrivals)
            metrics = compute_metrics(done.results, done.duration, percentiles=(99.0,))
            if metrics["failed"]:
                raise RuntimeError(f"{name}: {metrics['failed']} requests failed")
            runs[name].append({**{k: metrics[k] for k in METRICS},
                               "engine_steps": done.engine_steps,
                               "preemptions": done.preemptions})
            print(f"repeat {repeat} {name}: mean E2EL {metrics['mean_e2el_ms']:.1f} ms, "
                  f"{done.engine_steps} steps, {done.preemptions} preemptions")
    medians = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
               for name, rs in runs.items()}
    ratios = {name: {k: m[k] / medians["fcfs"][k] for k in METRICS}
              for name, m in medians.items()}
    return {"model": args.model, "trace": workload.trace.name,
            "trace_source": workload.trace.source, "num_requests": len(workload.trace),
            "length_filter": args.filter, "max_batch_tokens": args.max_batch_tokens,
            "kv_cache_tokens": args.kv_cache_tokens, "request_rate": "inf",
            "repeats": args.repeats, "runs": runs, "medians": medians,
            "ratio_to_fcfs": ratios}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trace", default="sharegpt", choices=list(TRACES))
    p.add_argument("--filter", default=CPU_FILTER)
    p.add_argument("--num-requests", type=int, default=160)
    p.add_argument("--max-batch-tokens", type=int, default=128)
    p.add_argument("--kv-cache-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here")
    return p.parse_args(argv)


def _torch_device(name: str):
    import torch
    return torch.device(name)


if __name__ == "__main__":
    sys.exit(main())
