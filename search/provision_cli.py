"""`nanorun provision`: the pool-sizing search (search/provision.py) from the command line."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path


def add_parser(sub) -> None:
    from .provision import MAX_MACHINES, OBJECTIVES, SPLITWISE_SLOS

    p = sub.add_parser(
        "provision", help="size a cluster (mixed pool or Splitwise pools) by simulation",
        description="Simulate clusters of DGX-like machines serving a trace, each machine "
                    "running nanorun's layout for its role with iteration times from the cost "
                    "model, and find for each design (one mixed SplitFuse pool; Splitwise's "
                    "prompt + token pools, with and without its mixed pool) the pool sizes "
                    "that meet the SLOs at the least cost, power or machine count. Writes "
                    "JSON and a plot.")
    p.add_argument("model", help="preset name (e.g. llama-2-70b) or model directory")
    p.add_argument("--gpu", default="h100",
                   help="machine kinds, comma-separated; a later one is a token pool for an "
                        "earlier one's prompt pool: a100, h100, h200 (default %(default)s)")
    p.add_argument("--trace", default="azure-conv",
                   help="azure-conv, azure-code, sharegpt, lmsys or a CSV path; several "
                        "comma-separated (default %(default)s)")
    p.add_argument("--rate", default="20",
                   help="Poisson arrivals, requests/s; several comma-separated, each searched "
                        "(default %(default)s)")
    p.add_argument("--num-requests", type=int, default=1000,
                   help="requests simulated, a window of the trace (default %(default)s)")
    p.add_argument("--slo", default=SPLITWISE_SLOS,
                   help="bounds NAME=BOUND, comma-separated; NAME ttft_p50/p90/p99, tbt_p50/"
                        "p90/p99; BOUND a slowdown against the request alone ('2x') or a time "
                        "('200ms'). Default: Splitwise's, %(default)s")
    p.add_argument("--reference", default="a100",
                   help="GPU kind of the idle machine slowdown SLOs are relative to (default "
                        "%(default)s, as Splitwise normalises); need not be in --gpu")
    p.add_argument("--objective", default="cost", choices=OBJECTIVES)
    p.add_argument("--designs", default="all",
                   help="comma-separated design names (mixed-h100, splitwise-h100/h100, "
                        "splitwise-h100/h100+pool, splitwise-h100/a100, ...) or all")
    p.add_argument("--layout", default="tuned",
                   help="each role's layout: tuned (a short search per role), auto (files "
                        "from `nanorun tune`), sequential or overlap (default %(default)s)")
    p.add_argument("--tune-trials", type=int, default=12)
    p.add_argument("--batch-tokens", type=int, default=2048,
                   help="dense batch per iteration (Splitwise's 2048, default)")
    p.add_argument("--mixed-budgets", default="256,512,1024,2048",
                   help="tokens per iteration a mixed pool may use, comma-separated: each is "
                        "tried and the cheapest kept (default %(default)s)")
    p.add_argument("--max-seqs", type=int, default=512,
                   help="requests a machine decodes at once (Splitwise's 512, default)")
    p.add_argument("--long-queue-tokens", type=int, default=8192,
                   help="prompt tokens queued on a prompt machine above which the mixed pool "
                        "borrows a token machine (Splitwise's 8192, default)")
    p.add_argument("--cost", default=None, help="$/h per machine, e.g. h100=38,a100=17.6")
    p.add_argument("--power", default=None, help="kW per machine, e.g. h100=10.2,a100=6.5")
    p.add_argument("--network-gbps", type=float, default=None,
                   help="machine-to-machine KV bandwidth, Gb/s (default 1600: 8 x 200 Gb/s)")
    p.add_argument("--filter", default="context",
                   help="trace length filter: context (requests that fit the model's context "
                        "window, default), nanoflow, none, or P,O,T")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="provision.json", help="JSON (default %(default)s)")
    p.add_argument("--plot", default=None, help="PNG (default: beside --out)")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=_provision, max_machines=MAX_MACHINES)


def _per_gpu(text: str | None, flag: str, gpus) -> dict[str, float]:
    if not text:
        return {}
    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        gpu, _, value = item.partition("=")
        try:
            out[gpu.strip().lower()] = float(value)
        except ValueError:
            raise ValueError(f"{flag} takes GPU=NUMBER pairs, got {item!r}") from None
        if gpu.strip().lower() not in gpus:
            raise ValueError(f"{flag} names {gpu!r}, which is not one of --gpu {','.join(gpus)}")
    return out


def machine_kinds(args) -> dict:
    from .cluster import MACHINES
    from nanorun.device import get_device

    gpus = tuple(dict.fromkeys(g.strip().lower() for g in args.gpu.split(",") if g.strip()))
    if not gpus:
        raise ValueError("--gpu is empty; give one or more of a100, h100, h200")
    for g in gpus:
        get_device(g)   # an unknown name fails here, with the known ones
        if g not in MACHINES:
            raise ValueError(f"no machine defaults for GPU {g!r} (cost, power, network); "
                             f"provision knows {', '.join(MACHINES)}")
    cost = _per_gpu(args.cost, "--cost", gpus)
    power = _per_gpu(args.power, "--power", gpus)
    kinds = {}
    for g in gpus:
        kind = MACHINES[g]
        changes = {}
        if g in cost:
            changes["cost_per_hour"] = cost[g]
        if g in power:
            changes["power_kw"] = power[g]
        if args.network_gbps is not None:
            changes["network_gbps"] = args.network_gbps
        if changes:
            kind = replace(kind, **changes, source=kind.source + "; overridden on the command "
                           f"line: {', '.join(changes)}")
        kinds[g] = kind
    return kinds


def _provision(args) -> int:
    from nanorun.benchmark.traces import load_trace
    from nanorun.models import resolve_model

    from .cluster import MACHINES
    from .provision import build_tables, designs_for, parse_slos, provision_trace
    from .provision_plot import plot_provision
    from .workload import Workload

    start = time.perf_counter()
    slos = parse_slos(args.slo)
    kinds = machine_kinds(args)
    gpus = tuple(kinds)
    designs = designs_for(gpus, args.designs)
    reference = _reference(args.reference, gpus)
    budgets = _budgets(args.mixed_budgets, args.batch_tokens)
    rates = _rates(args.rate)
    traces = [t.strip() for t in args.trace.split(",") if t.strip()]
    if not traces:
        raise ValueError("--trace is empty")
    if args.num_requests < 10:
        raise ValueError(f"--num-requests must be at least 10, got {args.num_requests}")
    config = resolve_model(args.model)[0]
    flt = _length_filter(args.filter, config)
    for t in traces:   # a bad trace fails before any table is built
        load_trace(t, num_requests=1, length_filter=flt)
    docs = []
    for t in traces:
        workload = Workload.from_trace(t, length_filter=flt, seed=args.seed)
        max_context = int(max(workload.prompt_lens + workload.output_lens))
        print(f"{t}: {len(workload.prompt_lens)} requests after the {args.filter} filter, mean "
              f"prompt {workload.mean_prompt:.0f}, mean output {workload.mean_output:.0f}; "
              f"simulating {args.num_requests} at {', '.join(f'{r:g}' for r in rates)} req/s")
        common = dict(batch_tokens=args.batch_tokens, layout=args.layout,
                      trials=args.tune_trials, seed=args.seed, max_seqs=args.max_seqs,
                      max_context=max_context)
        tables, layouts = build_tables(config, kinds, workload, **common)
        if reference not in kinds:   # only its idle runs are needed: one mixed table
            ref, ref_layouts = build_tables(config, {reference: MACHINES[reference]},
                                            workload, roles=("mixed",), **common)
            tables.update(ref)
            layouts.update(ref_layouts)
        for rate in rates:
            if len(rates) > 1:
                print(f" at {rate:g} req/s:")
            doc = provision_trace(config, kinds, tables, t, rate=rate,
                                  num_requests=args.num_requests, slos=slos, designs=designs,
                                  objective=args.objective, seed=args.seed, length_filter=flt,
                                  max_seqs=args.max_seqs,
                                  long_queue_tokens=args.long_queue_tokens,
                                  reference_gpu=reference, mixed_budgets=budgets)
            doc["layouts"] = layouts
            docs.append(doc)
            _say_direction(doc)
    out = Path(args.out)
    doc = {"command": "nanorun provision " + " ".join(shlex.quote(a) for a in _argv()),
           "model": config.name, "gpus": list(gpus), "objective": args.objective,
           "slowdown_reference": f"each request alone on an idle {reference} machine",
           "slos": ",".join(str(s) for s in slos),
           "machines": {g: {"gpus": k.gpus, "tp": k.gpus, "cost_per_hour": k.cost_per_hour,
                            "power_kw": k.power_kw, "network_gbps": k.network_gbps,
                            "source": k.source} for g, k in kinds.items()},
           "batch_tokens": args.batch_tokens, "max_seqs": args.max_seqs,
           "mixed_budgets": list(budgets),
           "long_queue_tokens": args.long_queue_tokens, "filter": args.filter,
           "layout": args.layout, "tune_trials": args.tune_trials, "seed": args.seed,
           "arrivals": "Poisson at --rate over a window of the trace's lengths",
           "cost_model": "nanorun.search built-in device specs, uncalibrated",
           "traces": docs, "seconds": round(time.perf_counter() - start, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out} ({doc['seconds']:.1f} s)")
    if not args.no_plot:
        png = plot_provision(doc, args.plot or out.with_suffix(".png"))
        print(f"wrote {png}")
    return 0


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        rates = ()
    if not rates or not all(0 < r < float("inf") for r in rates):
        raise ValueError(f"--rate {text!r}: give positive finite requests/s, comma-separated")
    return rates


def _budgets(text: str, batch_tokens: int) -> tuple[int, ...]:
    from .flags import ints

    values = ints(text, "--mixed-budgets")
    if max(values) > batch_tokens:
        raise ValueError(f"--mixed-budgets {text!r}: a budget cannot exceed --batch-tokens "
                         f"({batch_tokens})")
    return values


def _reference(name: str, gpus: tuple[str, ...]) -> str:
    from .cluster import MACHINES

    name = name.strip().lower()
    if name not in gpus and name not in MACHINES:
        raise ValueError(f"--reference {name!r}: use one of {', '.join(MACHINES)}")
    return name


def _length_filter(text: str, config):
    """"context": what fits the model's window (a prompt and its output together)."""
    from nanorun.benchmark.traces import LengthFilter, parse_length_filter

    if text.strip().lower() == "context":
        n = config.max_position_embeddings
        return LengthFilter(n - 1, n - 1, n)
    return parse_length_filter(text)


def _argv() -> list[str]:
    """The command line as typed after `provision` (what the JSON says made it)."""
    argv = sys.argv[1:]
    return argv[argv.index("provision") + 1:] if "provision" in argv else argv


def _say_direction(doc: dict) -> None:
    d = doc["splitwise_direction"]
    for c in d["designs"]:
        verdict = "" if c["agrees"] is None else \
            (" (as Splitwise reports)" if c["agrees"] else
             f" (Splitwise reports {d['splitwise_expects']})")
        print(f"  {c['design']}: {c['prompt_machines']} prompt, {c['token_machines']} token "
              f"machines: {c['found']}{verdict}")
