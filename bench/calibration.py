"""Is the calibrated cost model right? Predicted against measured iteration times (issue 5's
target: within 15 % for the tuned layouts, once a GPU profile exists).

    python bench/calibration.py MODEL --gpu h100 --profile search/profiles/h100.json \
        [--layouts sequential overlap layouts/llama-3-8b.h100.1792.json] [--trace azure-conv]
        [--batch-tokens 1792] [--mixes 3] [--device cuda] [--out bench/results/h100/calibration.json]

For each layout, the iterations the tuner judges it on (the trace's expected steady-state mix,
then sampled ones, at the layout's batch size) are predicted by the profile-calibrated model
and timed as whole iterations on the engine's executor (CUDA events after warm-up, medians;
search/measure.py). The JSON holds every (layout, mix) pair's predicted and measured ms and
error, per layout the worst error, and whether every tuned layout is within the target.
Built-in layouts ("sequential", "overlap") take --batch-tokens (default: the first layout
file's batch size, else 1024). On the CPU (--device cpu --gpu cpu) the same report runs on a
small model; it checks the tooling, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGET_PERCENT = 15.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--gpu", required=True, help="device spec the profile calibrates (h100, ...)")
    ap.add_argument("--profile", default=None, help="measured profile JSON (nanorun profile)")
    ap.add_argument("--layouts", nargs="+", default=["sequential", "overlap"])
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--filter", default="nanoflow")
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--mixes", type=int, default=3, help="iterations per layout (default 3)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="default bench/results/GPU/calibration.json")
    args = ap.parse_args()

    from nanorun.benchmark.environment import describe, write_result
    from nanorun.benchmark.traces import parse_length_filter
    from nanorun.layout import is_layout_file
    from nanorun.models import resolve_model
    from nanorun.search import CostModel, Predictor, Profile, Workload, get_device
    from nanorun.search.measure import Rig, environment, measure_layouts
    from nanorun.search.tune import Tuner

    config = resolve_model(args.model)[0]
    profile = Profile.load(args.profile) if args.profile else None
    predictor = Predictor(CostModel(config, get_device(args.gpu), profile=profile))
    workload = Workload.from_trace(args.trace, length_filter=parse_length_filter(args.filter))
    tuner = Tuner(predictor, workload, num_mixes=args.mixes)

    files = [name for name in args.layouts if is_layout_file(name)]
    default_batch = args.batch_tokens or (json.loads(Path(files[0]).read_text())["batch_tokens"]
                                          if files else 1024)
    layouts = []
    for name in args.layouts:
        batch = json.loads(Path(name).read_text())["batch_tokens"] if is_layout_file(name) \
            else default_batch
        layouts.append(predictor.resolve(name, batch))
    mixes = {lo.batch_tokens: tuner.mixes(lo.batch_tokens) for lo in layouts}
    rig = Rig.for_mixes(config, args.device, (m for ms in mixes.values() for m in ms))
    print(f"calibration of {config.name} on {args.gpu} ({rig.device}), profile "
          f"{Path(args.profile).name if args.profile else 'none (uncalibrated)'}, "
          f"trace {workload.name}:")
    rows = measure_layouts(predictor, rig, layouts, mixes.__getitem__,
                           workload.tokens_per_batch_token)
    for row, name in zip(rows, args.layouts):
        row["source"] = Path(name).name
    tuned = [r for r in rows if r["layout"] not in ("sequential", "overlap")]
    worst = max(r["max_abs_error_percent"] for r in rows)
    doc = {
        "model": config.name, "gpu_spec": args.gpu, "trace": workload.name,
        "filter": args.filter,
        "profile": Path(args.profile).name if args.profile else None,
        "target_percent": TARGET_PERCENT,
        "worst_abs_error_percent": worst,
        "tuned_within_target": all(r["max_abs_error_percent"] <= TARGET_PERCENT
                                   for r in tuned) if tuned else None,
        "partitions": rig.partitions_how,
        "environment": describe(rig.device) | environment(rig),
        "layouts": rows,
    }
    out = Path(args.out or f"bench/results/{args.gpu}/calibration.json")
    write_result(doc, out, indent=2)
    print(f"worst error {worst:.1f} % (target {TARGET_PERCENT:g} % for tuned layouts); "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
