"""`nanorun bench`: the subcommand's arguments, and what it prints and writes.

Imports of torch, the engine and matplotlib happen inside the command, so `nanorun --help`
does not pay for them.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from ..options import add_engine_arguments, engine_kwargs

CPU_FILTER = "256,128,384"
# EngineConfig fields that are not engine flags of `nanorun bench`, and why.
BENCH_ABSENT = {
    "layout": "bench compares several: its own --layout takes a list",
    "seed": "bench's own --seed seeds the engine too, with the trace window and arrivals",
    "role": "a prefill or decode engine needs a KV connector: `python -m nanorun.disagg` "
            "benchmarks such pairs",
    "tensor_parallel_size": "bench drives one engine in its process; benchmark a "
                            "tensor-parallel `nanorun serve` with bench --base-url",
}
# Passes by default: one pass cannot tell a layout's gain from a neighbour's load (a busy
# machine once gave overlap 3.53x sequential in one pass and 0.79x in the next). Three is the
# fewest with a middle pass to report and a range to judge it by, at three times the cost.
DEFAULT_REPEATS = 3
DESCRIPTION = """\
Throughput and latency of the engine on a request trace, under each --layout in turn (always
with "sequential" as the baseline), at each --request-rate. Prints a summary table; writes
vLLM-style results with --result-json and a figure with --plot. The defaults run in seconds on
a CPU: a tiny preset with random weights, 32 short requests of ShareGPT, 3 interleaved passes."""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="throughput and latency on a request trace, per layout",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="tiny-llama",
                   help="preset name or Hugging Face model directory (default: tiny-llama)")
    p.add_argument("--layout", nargs="+", default=["sequential", "overlap"],
                   help="layouts to compare: sequential, overlap, auto or a layout JSON file "
                        "(sequential always runs too, first)")
    p.add_argument("--trace", default="sharegpt",
                   help="azure-conv, azure-code, sharegpt, lmsys, a CSV path "
                        "(TIMESTAMP,ContextTokens,GeneratedTokens) or const:PxO "
                        "(default: sharegpt)")
    p.add_argument("--num-requests", type=int, default=32,
                   help="requests to run: a seeded contiguous window of the filtered trace "
                        "(default: 32; 0 = the whole trace)")
    p.add_argument("--filter", default=None,
                   help="nanoflow (prompt <= 3072, output <= 1024, sum <= 4096), "
                        f"MAX_PROMPT,MAX_OUTPUT,MAX_TOTAL, or none (default: {CPU_FILTER} "
                        "on a CPU, to keep it to seconds; nanoflow on a GPU; none for "
                        "const:PxO)")
    p.add_argument("--request-rate", nargs="+", type=_checked(_request_rate),
                   default=[math.inf],
                   help="requests/s, inf (all at once: peak throughput) or trace (the "
                        "trace's timestamps); several give a latency-vs-rate curve "
                        "(default: inf)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps between arrivals: 1 Poisson, <1 burstier "
                        "(default: 1.0)")
    p.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                   help="service-level objectives for request_goodput, e.g. ttft:500 tpot:50 "
                        "(names: ttft, tpot, e2el)")
    p.add_argument("--metric-percentiles", default="99",
                   help="comma-separated percentiles reported as p<N>_*_ms (default: 99)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the trace window, prompts, arrivals and random weights")
    prefixes = p.add_argument_group(
        "prefixes", "Workloads whose prompts share prefixes, as chats and agents do; the "
        "report gains the prefix cache's hit rate (cached prompt tokens over prompt tokens).")
    prefixes.add_argument("--system-prompt-len", type=int, default=0, metavar="TOKENS",
                          help="every prompt starts with the same TOKENS tokens (default: 0)")
    prefixes.add_argument("--turns", type=int, default=1,
                          help="multi-turn conversations: each TURNS rows of the trace are one "
                               "conversation's user messages and answers; each turn resends "
                               "the conversation so far plus its new message, after the "
                               "previous answer and a think time. --num-requests counts "
                               "turns, --request-rate starts conversations (default: 1, none)")
    prefixes.add_argument("--think-time", type=float, default=0.0, metavar="SECONDS",
                          help="mean pause between an answer and the next turn, drawn "
                               "exponential and seeded (default: 0)")
    engine = p.add_argument_group(
        "engine options (EngineConfig's fields; each layout's engine takes them)")
    add_engine_arguments(engine, absent=BENCH_ABSENT)
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                   help="passes over every layout, interleaved (sequential, A, B, sequential, "
                        "A, B, ...); each row is the median pass with the min-max over "
                        "passes, and a warning says where the spread of the ratio to "
                        "sequential is wider than its distance from 1.0, or that 1 pass "
                        f"gave no spread (default: {DEFAULT_REPEATS})")
    p.add_argument("--result-json", metavar="PATH", help="write the report as JSON here")
    p.add_argument("--plot", metavar="PATH", help="draw throughput and latency here (.png, .svg)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    http = p.add_argument_group(
        "a running server", "With --base-url, the requests go over HTTP (streaming "
        "/v1/completions, as `vllm bench serve` sends them) to a server already running, "
        "nanorun's or any OpenAI-compatible one; MODEL only gives the vocabulary the prompts "
        "are drawn from, and the engine options (--layout, --device, ...) are the server's "
        "business. The JSON has vLLM's fields per request rate.")
    http.add_argument("--base-url", default=None, metavar="URL",
                      help="e.g. http://127.0.0.1:8000")
    http.add_argument("--served-model-name", default=None,
                      help="the model name to send (default: the first of /v1/models)")
    http.add_argument("--max-concurrency", type=int, default=None,
                      help="at most this many requests in flight (default: no limit)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.base_url is not None:
        return _run_http(args)
    from .metrics import parse_goodput
    from .plot import plot_report
    from .report import build_report
    from .runner import BenchConfig, run_benchmark
    from .summary import format_summary

    options = engine_kwargs(args, absent=BENCH_ABSENT)
    config = BenchConfig(
        model=args.model, max_batch_tokens=options.pop("max_batch_tokens"),
        engine_options=options, trace=args.trace, num_requests=args.num_requests or None,
        length_filter=_length_filter(args), layouts=tuple(args.layout),
        request_rates=tuple(args.request_rate), burstiness=args.burstiness,
        goodput=tuple(parse_goodput(args.goodput).items()),
        percentiles=_percentiles(args.metric_percentiles), seed=args.seed,
        show_progress=not args.no_progress, repeats=args.repeats, prefixes=_prefixes(args))
    report = build_report(run_benchmark(config))
    print(format_summary(report))
    _write(report, args)
    if args.plot:
        _make_parent(args.plot)
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _run_http(args) -> int:
    """--base-url: drive a running server over HTTP."""
    from .http_client import HttpBenchConfig, format_http_summary, run_http_benchmark
    from .metrics import parse_goodput

    if args.plot:
        raise ValueError("--plot draws per-layout figures and does not apply to --base-url")
    config = HttpBenchConfig(
        base_url=args.base_url, model=args.model, served_model_name=args.served_model_name,
        trace=args.trace, num_requests=args.num_requests or None,
        length_filter=_length_filter(args), request_rates=tuple(args.request_rate),
        burstiness=args.burstiness, max_concurrency=args.max_concurrency,
        goodput=tuple(parse_goodput(args.goodput).items()),
        percentiles=_percentiles(args.metric_percentiles), seed=args.seed,
        prefixes=_prefixes(args))
    report = run_http_benchmark(config)
    print(format_http_summary(report))
    _write(report, args)
    return 0


def _write(report: dict, args) -> None:
    if args.result_json:
        _make_parent(args.result_json)
        with open(args.result_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, allow_nan=False)
            f.write("\n")
        print(f"wrote {args.result_json}")


def _prefixes(args):
    from .workload import Prefixes
    return Prefixes(system_prompt_len=args.system_prompt_len, turns=args.turns,
                    think_time=args.think_time)


def _length_filter(args):
    from .traces import parse_length_filter
    if args.filter is not None:
        return parse_length_filter(args.filter)
    if args.trace.startswith("const:"):     # its lengths are chosen already
        return None
    return parse_length_filter(CPU_FILTER if args.device == "cpu" else "nanoflow")


def _request_rate(text: str):
    from .arrivals import parse_request_rate
    return parse_request_rate(text)


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"--metric-percentiles {text!r}: use comma-separated numbers in "
                         f"(0, 100], e.g. 50,90,99") from None


def _checked(parse):
    """An argparse type that keeps the parser's own message when the value is bad."""
    def checked(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    checked.__name__ = parse.__name__.lstrip("_")
    return checked


def _make_parent(path: str) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
