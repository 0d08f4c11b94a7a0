"""Unpack one GPU session call's files into the results tree (docs/gpu_session.md).

    python bench/gpu_unpack.py FILES_AT bench/results/h200

FILES_AT is the device reply's folder (env.json, session.log, STAGE.json). Writes under DEST:
    session/       the call's files as they came back (commit these whole)
    device.json    the device report (GEMM rate, copy bandwidth, SMs, green contexts, graphs)
    attention.json the decode-attention figures
    traces/WORKLOAD.json   each serve workload's full `nanorun bench` report
    profiles/GPU.json, layouts/MODEL.GPU.json   the measured profile and the measured re-tune
and prints the figures the README's table takes, each with the file it came from. A rehearsal's
files (env.json "rehearsal": true) are refused unless --rehearsal: CPU figures never land in a
GPU's folder by mistake.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files_at", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--rehearsal", action="store_true", help="accept a CPU rehearsal's files")
    args = p.parse_args(argv)
    env_path = args.files_at / "env.json"
    if not env_path.is_file():
        print(f"no env.json in {args.files_at}: not a GPU session's files", file=sys.stderr)
        return 2
    env = json.loads(env_path.read_text())
    if env.get("rehearsal") and not args.rehearsal:
        print("these are a CPU rehearsal's files; refusing to unpack them as GPU results "
              "(--rehearsal to unpack anyway)", file=sys.stderr)
        return 2
    session = args.dest / "session"
    session.mkdir(parents=True, exist_ok=True)
    for f in sorted(args.files_at.iterdir()):
        if f.is_file() and not f.name.endswith(".part"):
            shutil.copy2(f, session / f.name)
    # In the session's order (env.json lists its stages), whichever came back.
    stages = {name: json.loads((args.files_at / f"{name}.json").read_text())
              for name in env.get("stages", {}) if (args.files_at / f"{name}.json").is_file()}
    written = extract(stages, args.dest, env)
    for path in written:
        print(f"wrote {path}")
    for line in readme_figures(stages, args.dest):
        print(line)
    return 0


def extract(stages: dict, dest: Path, env: dict) -> list[Path]:
    """The artifacts other tools read, out of the stage files."""
    written = []

    def put(rel: str, data) -> None:
        if data is None:
            return
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
        written.append(path)

    results = {name: s.get("results") or {} for name, s in stages.items()}
    put("device.json", results.get("device", {}).get("device"))
    put("attention.json", results.get("attention", {}).get("attention"))
    serve = results.get("serve", {}).get("serve") or {}
    for workload, report in (serve.get("reports") or {}).items():
        put(f"traces/{workload.replace(':', '-')}.json", report)
    gpu, model = env.get("gpu_spec", "gpu"), env.get("model", "model")
    tune = results.get("tune", {})
    put(f"profiles/{gpu}.json", tune.get("profile"))
    put(f"layouts/{model}.{gpu}.json", tune.get("layout"))
    return written


def readme_figures(stages: dict, dest: Path) -> list[str]:
    """What the README's performance table quotes, with the file each figure is in."""
    lines = ["", "README figures (status of each stage first):"]
    lines += [f"  {name}: {s['status']} in {s['seconds']} s (cap {s['cap_s']} s)"
              for name, s in stages.items()]
    serve = ((stages.get("serve") or {}).get("results") or {}).get("serve") or {}
    for workload, layouts in (serve.get("summary") or {}).items():
        path = dest / "traces" / f"{workload.replace(':', '-')}.json"
        for layout, f in layouts.items():
            ratio = f["throughput_ratio_to_sequential"]
            lines.append(f"  {workload:<16} {layout:<32} {f['total_token_throughput']:>10,.0f} "
                         f"tok/s  {f['percent_of_optimal']:5.1f} % of optimal  "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} sequential   ({path})")
    attention = ((stages.get("attention") or {}).get("results") or {}).get("attention") or {}
    for case in attention.get("cases", []):
        lines.append(f"  decode attention, {case['case']}: {case['gb_per_s']} GB/s, "
                     f"{case['share_of_copy_bandwidth']} of copy   ({dest / 'attention.json'})")
    return lines


if __name__ == "__main__":
    sys.exit(main())
