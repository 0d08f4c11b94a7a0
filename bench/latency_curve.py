"""Latency against load for one trace (issue 7, item 6): TTFT, TPOT and end-to-end latency of
"sequential" and one other layout at request rates chosen as fractions of the peak.

    python bench/latency_curve.py [MODEL] [--trace sharegpt] [--num-requests 200]
        [--layout overlap|LAYOUT.json] [--max-batch-tokens 1024] [--fractions 0.5 0.8 1.0 1.2]
        [--peak-from REPORT.json] [--device cuda] [--out PATH]

Why fractions of a measured peak: fixed rates say nothing on a device they were not chosen for
(all below the knee, or all past it). The peak is sequential's offline request throughput on the
same requests: read from a `nanorun bench` report given with --peak-from when that report ran
the same model, trace, requests, batch and seed (the session script passes the traces stage's),
else measured here first. Rates above 1.0 overload sequential; where the other layout's peak is
higher, its latency stays lower there, which is the point of the curve.

Runs `nanorun bench`'s own runner (Poisson arrivals, seeded), so the figures are computed
exactly as that command computes them; writes JSON with the command, the peak and where it came
from, one row per (layout, rate), and the full bench report. Runs on a CPU too (tiny presets).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from nanorun.benchmark import environment
from nanorun.benchmark.cli import CPU_FILTER
from nanorun.benchmark.report import build_report
from nanorun.benchmark.runner import BASELINE, BenchConfig, run_benchmark
from nanorun.benchmark.traces import parse_length_filter

LATENCIES = ("ttft", "tpot", "e2el")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = BenchConfig(
        model=args.model, engine_options={"device": args.device, "weights": "random"},
        max_batch_tokens=args.max_batch_tokens, trace=args.trace,
        num_requests=args.num_requests, length_filter=length_filter(args),
        layouts=(args.layout,), seed=args.seed, show_progress=False)
    peak = peak_from_report(args.peak_from, config) if args.peak_from else None
    if peak is None:
        print(f"measuring sequential's peak on {args.trace} ({args.num_requests} requests)")
        report = build_report(run_benchmark(replace(config, layouts=(BASELINE,))))
        peak = peak_of(report, "measured here, offline")
    print(f"peak: {peak['request_throughput']:.3f} requests/s ({peak['source']})")
    rates = tuple(round(f * peak["request_throughput"], 4) for f in args.fractions)
    report = build_report(run_benchmark(replace(config, request_rates=rates)))
    curve = [row(run, peak["request_throughput"]) for run in report["runs"]]
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": args.model, "trace": args.trace, "layout": args.layout,
           "fractions": list(args.fractions), "peak": peak, "curve": curve, "report": report}
    print_curve(curve)
    if args.out:
        environment.write_result(doc, args.out, device=args.device)
        print(f"wrote {args.out}")
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="llama-3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--trace", default="sharegpt")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--filter", default=None,
                   help="as nanorun bench's --filter (default: nanoflow on a GPU, "
                        f"{CPU_FILTER} on a CPU, none for const:PxO)")
    p.add_argument("--layout", default="overlap",
                   help="the layout beside sequential: overlap or a layout JSON")
    p.add_argument("--max-batch-tokens", type=int, default=1024)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.8, 1.0, 1.2],
                   help="request rates as fractions of sequential's peak")
    p.add_argument("--peak-from", type=Path, default=None,
                   help="a nanorun bench report holding sequential offline on the same requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path")
    args = p.parse_args(argv)
    if not args.fractions or min(args.fractions) <= 0:
        p.error("--fractions must be positive numbers, e.g. 0.5 0.8 1.0 1.2")
    if args.num_requests < 1:
        p.error("--num-requests must be at least 1")
    return args


def length_filter(args):
    """nanorun bench's default: nanoflow on a GPU, a short filter on a CPU, none for const."""
    if args.filter is not None:
        return parse_length_filter(args.filter)
    if args.trace.startswith("const:"):
        return None
    return parse_length_filter(CPU_FILTER if args.device == "cpu" else "nanoflow")


def peak_from_report(path: Path, config: BenchConfig) -> dict | None:
    """Sequential's offline run from an earlier report of the same workload, or None (saying
    why) when that report measured something else."""
    report = json.loads(path.read_text())
    head = report.get("nanorun", {})
    want = {"model": config.model, "max_batch_tokens": config.max_batch_tokens,
            "seed": config.seed, "length_filter": str(config.length_filter)
            if config.length_filter else None,
            "device_type": "cuda" if config.device.startswith("cuda") else config.device}
    differs = {k: (head.get(k), v) for k, v in want.items() if head.get(k) != v}
    if head.get("trace") != Path(config.trace).stem and head.get("trace") != config.trace:
        differs["trace"] = (head.get("trace"), config.trace)
    if head.get("num_requests", 0) + head.get("num_skipped", 0) != config.num_requests:
        differs["num_requests"] = (head.get("num_requests"), config.num_requests)
    if differs:
        print(f"not using {path.name} for the peak: it differs in {differs}")
        return None
    try:
        return peak_of(report, f"{path.name}, sequential offline")
    except ValueError as e:
        print(f"not using {path.name} for the peak: {e}")
        return None


def peak_of(report: dict, source: str) -> dict:
    for run in report["runs"]:
        if run["nanorun"]["layout"] == BASELINE and run["request_rate"] == "inf":
            if not run["completed"]:
                raise ValueError("its sequential offline run completed no request")
            return {"source": source, "request_throughput": run["request_throughput"],
                    "total_token_throughput": run["total_token_throughput"],
                    "completed": run["completed"], "failed": run["failed"]}
    raise ValueError("it has no sequential run at request rate inf")


def row(run: dict, peak_rate: float) -> dict:
    out = {"layout": run["nanorun"]["layout"], "request_rate": run["request_rate"],
           "fraction_of_peak": round(run["request_rate"] / peak_rate, 3),
           "offered_rate": run["nanorun"]["offered_rate"],
           "request_throughput": run["request_throughput"],
           "total_token_throughput": run["total_token_throughput"],
           "completed": run["completed"], "failed": run["failed"]}
    for name in LATENCIES:
        for stat in ("mean", "median", "p99"):
            out[f"{stat}_{name}_ms"] = run.get(f"{stat}_{name}_ms")
    return out


def print_curve(curve: list[dict]) -> None:
    print(f"\n{'layout':<28} {'req/s':>8} {'x peak':>7} {'tok/s':>9} {'TTFT ms':>9} "
          f"{'p99 TTFT':>9} {'TPOT ms':>8} {'p99 E2E ms':>11}")
    for r in curve:
        cells = [r.get(k) for k in ("mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_e2el_ms")]
        ttft, p99_ttft, tpot, p99_e2e = (math.nan if c is None else c for c in cells)
        print(f"{r['layout'][:28]:<28} {r['request_rate']:>8.3f} {r['fraction_of_peak']:>7.2f} "
              f"{r['total_token_throughput']:>9.0f} {ttft:>9.1f} {p99_ttft:>9.1f} {tpot:>8.2f} "
              f"{p99_e2e:>11.1f}")


if __name__ == "__main__":
    sys.exit(main())
