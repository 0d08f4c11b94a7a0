"""`nanorun tune` and `nanorun plan`: the search and the cost model from the command line
(`nanorun provision`, the cluster sizing, is in search/provision_cli.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .flags import ints

DEFAULT_TRACE = "azure-conv"


def add_parsers(sub) -> None:
    _add_tune(sub)
    _add_plan(sub)
    _add_profile(sub)
    from .provision_cli import add_parser as _add_provision

    _add_provision(sub)


def _common(p) -> None:
    p.add_argument("model", help="preset name (e.g. llama-3-8b) or model directory")
    p.add_argument("--gpu", default="h100", help="device spec: h100, h200, a100, l40s, cpu")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--profile", default=None,
                   help="a measured profile JSON (nanorun profile) to calibrate the cost model")


def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune", help="search the pipeline layout for a model and GPU (no GPU needed)",
        description="Search nano-batch layouts with Optuna over the cost model and the engine's "
                    "own planner; print the best, write it as JSON where layout='auto' finds "
                    "it ($NANORUN_LAYOUT_DIR if set, else ./layouts) and draw its pipeline.")
    _common(p)
    p.add_argument("--trace", default=DEFAULT_TRACE,
                   help="workload: azure-conv, azure-code, sharegpt, lmsys, a CSV path, or "
                        "const:PROMPTxOUTPUT (default %(default)s)")
    p.add_argument("--filter", default="nanoflow",
                   help="length filter: 'nanoflow' (prompt<=3072, output<=1024, sum<=4096), "
                        "'none', or P,O,T")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="largest dense batch to consider (default: the largest whose KV cache "
                        "fits the device's memory)")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multi-objective", action="store_true",
                   help="NSGA-II over (throughput, iteration latency); prints the Pareto front")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL, e.g. sqlite:///tune.db, so a study resumes")
    p.add_argument("--study-name", default=None)
    p.add_argument("--out", default=None,
                   help="layout JSON (default: MODEL.GPU[.tpN].BATCH.json in "
                        "$NANORUN_LAYOUT_DIR, else in ./layouts)")
    p.add_argument("--plot", default=None, help="Gantt chart PNG (default: beside --out)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--measure", type=int, nargs="?", const=5, default=0, metavar="K",
                   help="re-time the K best candidates (default 5) and sequential as whole "
                        "iterations on --device with the engine's executor, and keep the "
                        "measured winner (needs a GPU for GPU specs)")
    p.add_argument("--device", default="cuda", help="where --measure runs (default cuda)")
    p.set_defaults(func=_tune)


def _add_profile(sub) -> None:
    p = sub.add_parser(
        "profile", help="measure a model's ops on this GPU to calibrate the cost model",
        description="Time every layer op over token counts x SM partitions, decode attention "
                    "at a context, GEMM and attention overlapping, and the device's GEMM rate "
                    "and copy bandwidth; write a profile JSON for tune/plan --profile.")
    p.add_argument("model", help="preset name (e.g. llama-3-8b) or model directory")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--gpu", default=None,
                   help="the device spec this calibrates (default: from the device's name)")
    p.add_argument("--tokens", default=",".join(map(str, _measure_defaults()[0])),
                   help="token counts, comma-separated (default %(default)s)")
    p.add_argument("--sms", default=None,
                   help="SM counts, comma-separated (default: quarters of the device)")
    p.add_argument("--context", type=int, default=_measure_defaults()[1],
                   help="decode attention context (default %(default)s)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree: run under `torchrun --nproc-per-node N` (one "
                        "GPU per rank); times each rank's shard of the ops and sweeps the "
                        "collectives, which then replace the published tables")
    p.add_argument("--collective-bytes", default=None,
                   help="message sizes of the collective sweep at --tp > 1, comma-separated "
                        "(default 4 KiB to 64 MiB, every factor of 4)")
    p.add_argument("--out", default=None,
                   help="profile JSON (default profiles/GPU.json; profiles/GPU.tpN.json)")
    p.set_defaults(func=_profile)


def _measure_defaults():
    from .measure import DEFAULT_CONTEXT, DEFAULT_TOKENS

    return DEFAULT_TOKENS, DEFAULT_CONTEXT


def _profile(args) -> int:
    from .measure import DEFAULT_COLLECTIVE_BYTES, Rig, profile

    tokens = ints(args.tokens, "--tokens")
    sms = ints(args.sms, "--sms") if args.sms else None
    sweep = ints(args.collective_bytes, "--collective-bytes") if args.collective_bytes \
        else DEFAULT_COLLECTIVE_BYTES
    if args.tp < 1:
        raise ValueError(f"--tp must be a positive integer, got {args.tp}")
    # Positions reach the context (decode attention) and max(tokens) (a prompt's first chunk).
    rig = Rig(args.model, args.device, num_layers=1, max_tokens=max(tokens),
              max_context=max(args.context + 1, max(tokens)),
              kv_tokens=max(tokens) * (args.context + 16), tp=args.tp)
    try:
        driver = rig.tensor_parallel.is_driver       # every rank measures; rank 0 reports
        say = print if driver else (lambda *_: None)
        gpu = args.gpu or rig.spec.name
        say(f"profiling {rig.config.name} on {gpu} ({rig.device}, {rig.dtype}, tp={args.tp}): "
            f"{len(tokens)} token counts, attention at context {args.context}")
        start = time.perf_counter()
        prof = profile(rig, gpu, tokens=tokens, sms=sms, context=args.context,
                       collective_bytes=sweep, log=say)
        if not driver:
            return 0
        out = Path(args.out or f"profiles/{gpu}{f'.tp{args.tp}' if args.tp > 1 else ''}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        prof.provenance["command"] = "nanorun profile " + " ".join(
            [args.model, "--device", args.device, "--tokens", args.tokens, "--context",
             str(args.context)] + (["--sms", args.sms] if args.sms else [])
            + ([f"--tp {args.tp}"] if args.tp > 1 else [])
            + (["--collective-bytes", args.collective_bytes] if args.collective_bytes else []))
        if args.tp > 1:
            prof.provenance["command"] = f"torchrun --nproc-per-node {args.tp} -m nanorun.cli " \
                + prof.provenance["command"].removeprefix("nanorun ")
        prof.save(out)
        print(f"partitions: {rig.partitions_how}")
        print(f"profiled in {time.perf_counter() - start:.1f} s; wrote {out}")
        return 0
    finally:
        rig.tensor_parallel.shutdown()


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="show a layout's plan and its predicted pipeline",
        description="Plan one iteration under a layout and draw one layer's pipeline as a "
                    "Gantt chart, durations from the cost model.")
    _common(p)
    p.add_argument("--layout", default="overlap",
                   help="sequential, overlap, or a layout JSON path")
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--decode-seqs", type=int, default=None,
                   help="decode tokens in the batch (default: half of it)")
    p.add_argument("--decode-context", type=int, default=1024)
    p.add_argument("--plot", default=None, help="Gantt chart PNG")
    p.add_argument("--layer", type=int, default=None, help="layer to draw (default: middle)")
    p.add_argument("--measure", action="store_true",
                   help="also run the iteration on --device with every launch timed (CUDA "
                        "events on a GPU) and draw the measured pipeline")
    p.add_argument("--device", default="cuda", help="where --measure runs (default cuda)")
    p.set_defaults(func=_plan)


def _predictor(args):
    from nanorun.models import resolve_model

    from .costmodel import CostModel
    from .evaluate import Predictor
    from nanorun.device import get_device
    from .profile import Profile

    config = resolve_model(args.model)[0]
    profile = Profile.load(args.profile) if args.profile else None
    return Predictor(CostModel(config, get_device(args.gpu), tp=args.tp, profile=profile))


def _tune(args) -> int:
    from nanorun.benchmark.traces import parse_length_filter
    from nanorun.layout import tuned_layout_path, tuned_layout_stem

    from .tune import Tuner, provenance, tune
    from .workload import Workload

    predictor = _predictor(args)
    workload = Workload.from_trace(args.trace, length_filter=parse_length_filter(args.filter),
                                   seed=args.seed)
    tuner = Tuner(predictor, workload, seed=args.seed)
    c, dev = predictor.cost.config, predictor.device
    print(f"tuning {c.name} on {dev.name} (tp={args.tp}) for {workload.name}: "
          f"{len(workload.prompt_lens)} requests, mean prompt {workload.mean_prompt:.0f}, "
          f"mean output {workload.mean_output:.0f} tokens; {args.trials} trials, seed {args.seed}")
    space = None
    if args.max_batch_tokens is not None:
        top = min(args.max_batch_tokens, tuner.max_batch_tokens())
        if top < 1:
            raise ValueError(f"--max-batch-tokens must be positive, got {args.max_batch_tokens}")
        space = tuner.space(tuple(range(256, top + 1, 256)) or (top,))
    start = time.perf_counter()
    result = tune(tuner, trials=args.trials, seed=args.seed, multi_objective=args.multi_objective,
                  space=space,
                  storage=args.storage, study_name=args.study_name,
                  progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    layout = result.layout
    name = tuned_layout_stem(c.name, dev.name, args.tp)
    out = Path(args.out) if args.out else tuned_layout_path(c.name, dev.name,
                                                            layout.batch_tokens, args.tp)
    prov = provenance(tuner, trials=result.trials, seed=args.seed, trace=workload.name,
                      profile=Path(args.profile).name if args.profile else None,
                      multi_objective=args.multi_objective)
    prov["filter"] = args.filter
    prov["command"] = _tune_command(args, out)
    prov["search_s"] = round(elapsed, 2)
    prov["cpu_count"] = os.cpu_count()
    doc = layout.to_dict()
    doc["name"] = f"tuned:{name}"
    doc["predicted"] = result.predicted()
    doc["provenance"] = prov
    if result.pareto:
        doc["pareto"] = result.pareto
    if args.measure:
        layout, doc = _measure(args, predictor, tuner, result, doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")

    p = doc["predicted"]
    print(f"searched {result.trials} trials in {elapsed:.1f} s")
    print(_describe(layout, dev))
    print(f"predicted: {p['tokens_per_s']:,.0f} tokens/s (prompt + output), "
          f"{p['percent_of_optimal']:.1f} % of optimal ({p['optimal_tokens_per_s']:,.0f}), "
          f"{p['speedup_vs_sequential']:.3f}x sequential ({p['sequential_tokens_per_s']:,.0f}); "
          f"iteration {p['iteration_ms']:.2f} ms")
    if result.pareto:
        print("Pareto front (tokens/s, iteration ms):",
              ", ".join(f"({q['tokens_per_s']:,.0f}, {q['iteration_ms']:.2f})"
                        for q in result.pareto[:8]))
    print(f"wrote {out}")
    if not args.no_plot:
        from .plot import gantt

        png = Path(args.plot or out.with_suffix(".png"))
        schedule = predictor.schedule(layout, tuner.mixes(layout.batch_tokens)[0])
        gantt(schedule, layout, _kinds(predictor), png, device=dev,
              title=f"{c.name} on {dev.name}{f' (tp {args.tp})' if args.tp > 1 else ''}, "
                    f"dense batch {layout.batch_tokens}, tuned for {workload.name}: "
                    f"{p['tokens_per_s']:,.0f} tok/s predicted, "
                    f"{p['speedup_vs_sequential']:.3f}x sequential")
        print(f"wrote {png}")
    return 0


def _tune_command(args, out: Path) -> str:
    """The command line that made a tuned layout (the output only as a relative path: results
    carry no machine paths)."""
    words = ["nanorun", "tune", args.model, "--gpu", args.gpu]
    words += ["--tp", str(args.tp)] if args.tp > 1 else []
    words += [f"--{k.replace('_', '-')}" + (f" {v}" if v is not True else "")
              for k, v in (("trace", args.trace), ("filter", args.filter),
                           ("trials", args.trials), ("seed", args.seed),
                           ("max_batch_tokens", args.max_batch_tokens),
                           ("multi_objective", args.multi_objective))
              if v not in (None, False) and v != DEFAULTS.get(k)]
    if args.out and not Path(args.out).is_absolute():
        words += ["--out", args.out]
    return " ".join(words)


DEFAULTS = {"trace": DEFAULT_TRACE, "filter": "nanoflow", "trials": 200, "seed": 0}


def _measure(args, predictor, tuner, result, doc):
    """--measure: time the best candidates and sequential for real; the measured winner
    becomes the written layout, with its measured figures beside the predicted ones."""
    from .measure import Rig, measure_layouts
    from .tune import prediction

    candidates = result.candidates[: args.measure]
    layouts = candidates + [tuner.sequential(b) for b in
                            sorted({c.batch_tokens for c in candidates})]
    mixes = {b: tuner.mixes(b) for b in {lo.batch_tokens for lo in layouts}}
    rig = Rig.for_mixes(args.model, args.device, (m for ms in mixes.values() for m in ms))
    print(f"measuring {len(layouts)} layouts on {rig.device} ({rig.spec.name}):")
    rows = measure_layouts(predictor, rig, layouts, mixes.__getitem__,
                           tuner.workload.tokens_per_batch_token)
    tuned = rows[: len(candidates)]
    best = max(range(len(tuned)), key=lambda i: tuned[i]["measured_tokens_per_s"])
    seq = {r["batch_tokens"]: r for r in rows[len(candidates):]}
    winner, row = candidates[best], tuned[best]
    optimal = predictor.cost.optimal_tokens_per_s()
    doc = dict(winner.to_dict(), name=doc["name"], provenance=doc["provenance"])
    doc["predicted"] = prediction(tuner, winner)
    doc["measured"] = {
        "device": rig.spec.name, "tokens_per_s": row["measured_tokens_per_s"],
        "speedup_vs_sequential": round(row["measured_tokens_per_s"] /
                                       seq[winner.batch_tokens]["measured_tokens_per_s"], 4),
        "percent_of_optimal": round(100.0 * row["measured_tokens_per_s"] / optimal, 2),
        "candidates": rows}
    doc["provenance"]["measured"] = {"candidates": len(candidates), "device": args.device}
    m = doc["measured"]
    print(f"measured winner: candidate {best + 1} of {len(candidates)}, "
          f"{m['tokens_per_s']:,.0f} tokens/s, {m['speedup_vs_sequential']:.3f}x sequential "
          f"measured side by side, {m['percent_of_optimal']:.1f} % of optimal")
    return winner, doc


def _plan(args) -> int:
    from .workload import IterationMix

    predictor = _predictor(args)
    b = args.batch_tokens
    d = b // 2 if args.decode_seqs is None else args.decode_seqs
    if not 0 <= d <= b:
        raise ValueError(f"--decode-seqs must be between 0 and --batch-tokens ({b})")
    mix = IterationMix((args.decode_context,) * d, ((0, b - d),) if b > d else ())
    layout = predictor.resolve(args.layout, b)
    schedule = predictor.schedule(layout, mix)
    plan = schedule.plan
    waits = sum(len(launch.waits) for launch in plan.launches)
    print(_spec_line(predictor.device, args))
    print(_describe(layout, predictor.device))
    print(f"plan: {len(plan.launches)} launches on {plan.num_streams} stream(s), {waits} "
          f"cross-stream waits, {len(plan.recorded)} events recorded")
    print(f"predicted iteration ({d} decode tokens at context {args.decode_context}, "
          f"{b - d} prompt tokens): {schedule.makespan * 1e3:.3f} ms")
    _busy(schedule, layout)
    title = "predicted"
    if args.measure:
        from .measure import Rig

        rig = Rig.for_mixes(args.model, args.device, [mix])
        schedule = rig.timeline(layout, mix)
        print(f"measured on {rig.device} ({rig.spec.name}, {rig.partitions_how}): "
              f"{schedule.makespan * 1e3:.3f} ms")
        _busy(schedule, layout)
        title = f"measured on {rig.spec.name}"
    if args.plot:
        from .plot import gantt

        c = predictor.cost.config
        path = gantt(schedule, layout, _kinds(predictor), args.plot, layer=args.layer,
                     device=predictor.device,
                     title=f"{c.name} on {predictor.device.name}, layout {layout.name}, dense "
                           f"batch {b} ({d} decode + {b - d} prompt tokens): {title} "
                           f"{schedule.makespan * 1e3:.2f} ms per iteration")
        print(f"wrote {path}")
    return 0


def _busy(schedule, layout) -> None:
    for s, part in enumerate(layout.partitions):
        print(f"  {part.name:8s} busy {schedule.busy(s) * 1e3:8.3f} ms "
              f"({100 * schedule.busy(s) / schedule.makespan:5.1f} %)")


def _kinds(predictor) -> dict[str, str]:
    """Each launch's kind, for the Gantt chart's colours: the layer's ops and the frame."""
    from nanorun.models import model_frame_ops

    ops = predictor.ops + model_frame_ops(predictor.cost.config)
    return {op.name: op.kind for op in ops}


def _spec_line(dev, args) -> str:
    """Which device spec the figures come from, so a reader knows what was assumed."""
    if dev.sm_count is None:
        what = "the CPU, not partitioned by SMs"
    else:
        what = (f"{dev.sm_count} SMs in steps of {dev.sm_granularity}, {dev.bf16_tflops:g} "
                f"TFLOP/s bf16, {dev.hbm_gbps / 1e3:g} TB/s, {dev.memory_gib:g} GiB")
    calibration = f"calibrated by {args.profile}" if args.profile else \
        "uncalibrated (built-in spec; `--profile` takes a measured one)"
    return f"device spec {dev.name}: {what}; tp={args.tp}; cost model {calibration}"


def _describe(layout, device=None) -> str:
    parts = ", ".join(f"{p.name}={p.sm_count if p.sm_count else 'all'} SMs"
                      for p in layout.partitions)
    used = sum(p.sm_count or 0 for p in layout.partitions)
    if device is not None and device.sm_count and 0 < used < device.sm_count:
        parts += (f" ({used} of {device.sm_count}: partitions come in steps of "
                  f"{device.sm_granularity} SMs, and the rest is too few for one)"
                  if device.sm_count - used < device.sm_granularity else
                  f" ({used} of {device.sm_count}; {device.sm_count - used} left idle)")
    splits = {}
    for op, ol in layout.ops:
        splits.setdefault((ol.splits, ol.partition), []).append(op)
    groups = "; ".join(f"{'/'.join(ops)}: {list(s)} on {p}" for (s, p), ops in splits.items())
    shifted = [f"{e[0]}[{e[1]}]" for e in layout.issue_order() if len(e) > 2 and e[2]]
    return (f"layout {layout.name}: dense batch {layout.batch_tokens} tokens; partitions "
            f"{parts}\n  splits: {groups}"
            + (f"\n  pipelined a layer behind: {', '.join(shifted)}" if shifted else ""))
