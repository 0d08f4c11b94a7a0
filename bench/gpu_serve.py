"""The GPU session's serving figures: one model, several workloads, every layout, one process.

    python bench/gpu_serve.py llama-3-8b --device cuda --layouts sequential overlap L.json \
        --workloads const:1024x512 sharegpt --num-requests 64 200 [--repeats N] --out P

Offline (all requests at once), random weights, through nanorun.benchmark.run_traces: the
device's ceilings are measured once, and each layout's engine is built once and serves every
workload in turn (building an 8B engine costs more than serving 64 requests). Every layout runs
at one dense batch: --max-batch-tokens, else the first layout JSON's own (the tuned one), else
1024. Writes one JSON: per workload the full `nanorun bench` report, and a `summary` of what the
README's table takes from it (total tokens/s, % of optimal, ratio to sequential per layout).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanorun.benchmark.cli import CPU_FILTER
from nanorun.benchmark.report import build_report
from nanorun.benchmark.runner import BenchConfig, layout_label, run_traces
from nanorun.benchmark.summary import format_summary
from nanorun.benchmark.traces import parse_length_filter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layouts", nargs="+", default=["sequential", "overlap"])
    p.add_argument("--workloads", nargs="+", default=["const:1024x512", "sharegpt"])
    p.add_argument("--num-requests", nargs="+", type=int, default=[64, 200],
                   help="one per workload")
    p.add_argument("--max-batch-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--filter", default=None, help="as nanorun bench's (default: nanoflow on a "
                                                   f"GPU, {CPU_FILTER} on the CPU)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if len(args.num_requests) != len(args.workloads):
        p.error("give one --num-requests per workload")
    batch = args.max_batch_tokens or _layout_batch(args.layouts) or 1024
    # The CLI's default filters: NanoFlow's on a GPU, a short one on the CPU (const:PxO keeps
    # its own lengths); one filter for every workload, as each `nanorun bench` would apply.
    filt = parse_length_filter(args.filter or (CPU_FILTER if args.device == "cpu" else
                                               "nanoflow"))
    config = BenchConfig(model=args.model,
                         engine_options={"device": args.device, "weights": "random"},
                         max_batch_tokens=batch, layouts=tuple(args.layouts),
                         length_filter=filt, repeats=args.repeats, show_progress=False)
    measurements = run_traces(config, tuple(args.workloads),
                              num_requests=tuple(args.num_requests))
    reports = {w: build_report(m) for w, m in zip(args.workloads, measurements)}
    for report in reports.values():
        print(format_summary(report), flush=True)
    out = {"model": args.model, "device": args.device, "max_batch_tokens": batch,
           "layouts": [layout_label(x) for x in args.layouts], "repeats": args.repeats,
           "summary": {w: summary(r) for w, r in reports.items()}, "reports": reports}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out}")
    failed = sum(run["failed"] for r in reports.values() for run in r["runs"])
    return 1 if failed else 0


def summary(report: dict) -> dict:
    """Per layout: the figures the README's performance table quotes."""
    return {run["nanorun"]["layout"]: {
        "total_token_throughput": run["total_token_throughput"],
        "percent_of_optimal": run["nanorun"]["percent_of_optimal"],
        "throughput_ratio_to_sequential": run["nanorun"]["throughput_ratio_to_sequential"],
        "completed": run["completed"], "failed": run["failed"]}
        for run in report["runs"]}


def _layout_batch(layouts: list[str]) -> int | None:
    for layout in layouts:
        if layout.endswith(".json") and Path(layout).is_file():
            return int(json.loads(Path(layout).read_text())["batch_tokens"])
    return None


if __name__ == "__main__":
    sys.exit(main())
