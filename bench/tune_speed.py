"""How long does the README's quick start, `nanorun tune llama-3-8b --gpu h100`, take on a CPU,
and what does it pick? (The target: under 2 minutes on a 2-core machine.)

    python bench/tune_speed.py [--trials 200] [--repeats 3] [--out bench/results/cpu/tune_speed.json]

The defaults are `nanorun tune`'s own (200 trials, seed 0, azure-conv, the nanoflow filter), so
the figures are the ones the quick start prints.

Times the search itself (workload loading, Optuna trials, scoring the winner and the
sequential baseline) over several repeats with the same seed, and writes the median, every
run, the layout found and the machine's core count as JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--gpu", default="h100")
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/cpu/tune_speed.json")
    args = ap.parse_args()

    from nanorun.benchmark.environment import write_result
    from nanorun.benchmark.traces import NANOFLOW_FILTER
    from nanorun.models import get_preset
    from nanorun.search import CostModel, Predictor, Workload, get_device
    from nanorun.search.tune import Tuner, tune

    runs, result = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        workload = Workload.from_trace(args.trace, length_filter=NANOFLOW_FILTER)
        tuner = Tuner(Predictor(CostModel(get_preset(args.model), get_device(args.gpu))),
                      workload)
        result = tune(tuner, trials=args.trials, seed=0)
        runs.append(time.perf_counter() - start)
    doc = {
        "model": args.model, "gpu_spec": args.gpu, "trace": args.trace,
        "filter": "nanoflow", "trials": args.trials,
        "median_s": round(statistics.median(runs), 2), "runs_s": [round(r, 2) for r in runs],
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "predicted": result.predicted(), "layout": result.layout.to_dict(),
    }
    write_result(doc, args.out, indent=2)
    print(f"{args.trials} trials: median {doc['median_s']} s over {args.repeats} runs "
          f"({doc['runs_s']}), {os.cpu_count()} cores; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
