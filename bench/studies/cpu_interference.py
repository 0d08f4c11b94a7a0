"""How much work on one core slows an engine on another, on this machine.

    python bench/studies/cpu_interference.py [--passes 5] [--duty 0.15 0.3 1.0]
                                     [--out bench/results/cpu/cpu_interference.json]

`nanorun serve` on a CPU puts its HTTP process (and, in bench/serve_overhead.py, the client)
beside the engine. With the engine on one thread (--cpu-threads 1) they never share a core, so
on independent cores the server would cost the engine nothing. This measures whether the cores
are independent: bench/serve_overhead.py's small model and workload, in process, with the
engine pinned to CPU 0 at one thread, alone and while a process pinned to CPU 1 spins for
`duty` of every millisecond (the HTTP side's CPU share is about 0.1-0.2 of a core there).
Passes alternate alone / loaded, each loaded pass paired with the alone pass before it. On a
virtual machine whose vCPUs share a physical core (SMT siblings, or a hypervisor's time
slices), the loaded passes are slower, and that is a cost any server process pays there.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")   # as serve_overhead.py

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

SPIN = """
import sys, time
duty = float(sys.argv[1])
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < duty * 1e-3:
        pass
    if duty < 1:
        time.sleep((1 - duty) * 1e-3)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--duty", type=float, nargs="+", default=[0.15, 0.3, 1.0])
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--out", default="bench/results/cpu/cpu_interference.json")
    args = p.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs to pin the engine and the load apart")

    import torch
    from serve_overhead import figures, in_process_pass, write_model

    from nanorun.benchmark import arrivals as arrival_process
    from nanorun.benchmark import environment
    from nanorun.benchmark.cli import CPU_FILTER
    from nanorun.benchmark.runner import Workload
    from nanorun.benchmark.traces import load_trace, parse_length_filter
    from nanorun.models import resolve_model

    engine_cpu, load_cpu = sorted(os.sched_getaffinity(0))[:2]
    machine = environment.describe(torch.device("cpu"))
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "llama-small", "small")
        mc = resolve_model(str(model_dir))[0]
        trace = load_trace("sharegpt", num_requests=args.num_requests, seed=0,
                           length_filter=parse_length_filter(CPU_FILTER))
        workload = Workload.fit_limits(trace, mc.max_position_embeddings, mc.vocab_size, 0,
                                       "longer than the context")
        arrivals = arrival_process.schedule(workload.trace, math.inf)
        os.sched_setaffinity(0, {engine_cpu})

        def tokens_per_s() -> float:
            run, _ = in_process_pass(model_dir, workload, arrivals, cpu_threads=1)
            return figures(run.results, run.duration)["total_token_throughput"]

        for duty in args.duty:
            alone, loaded = [], []
            for k in range(args.passes):
                alone.append(tokens_per_s())
                spin = subprocess.Popen(["taskset", "-c", str(load_cpu), sys.executable, "-c",
                                         SPIN, str(duty)])
                try:
                    time.sleep(0.2)
                    loaded.append(tokens_per_s())
                finally:
                    spin.kill()
                    spin.wait()
                print(f"duty {duty}: pass {k + 1}: alone {alone[-1]:,.0f} tok/s, loaded "
                      f"{loaded[-1]:,.0f} tok/s", flush=True)
            ratios = [b / a for a, b in zip(alone, loaded)]
            results[str(duty)] = {"alone_tokens_per_s": alone, "loaded_tokens_per_s": loaded,
                                  "loaded_over_alone": ratios,
                                  "median_ratio": statistics.median(ratios)}
            print(f"duty {duty}: loaded / alone, median of pairs "
                  f"{results[str(duty)]['median_ratio']:.3f}")
    report = {"command": environment.command_line(), "environment": machine,
              "cpu_cores": os.cpu_count(), "engine_cpu": engine_cpu, "load_cpu": load_cpu,
              "model": "serve_overhead.py's small (random weights), 1 thread, in process",
              "workload": f"{len(workload.trace)} ShareGPT requests offline, filter {CPU_FILTER}",
              "load": "a busy loop pinned to load_cpu, busy for `duty` of every millisecond",
              "load_average_1_5_15min": {"before": list(load_before),
                                         "after": list(os.getloadavg())},
              "duty": results}
    environment.write_result(report, ROOT / args.out, indent=2)     # (an absolute --out stays as it is)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
