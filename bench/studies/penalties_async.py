"""Does one penalised request still cost everyone async scheduling's overlap? The async
engine over 32 requests with none or one of them penalised, before and after the penalty
counts moved to the device (nanorun.sampler.TokenCounts), side by side in one run.

    python bench/studies/penalties_async.py [--baseline-python PY] [--model tiny-llama]
                                    [--requests 32] [--max-tokens 48] [--passes 5]
                                    [--out bench/results/cpu/penalties_async.json]

"after" is the nanorun this script's interpreter imports; "before" (optional) the one
--baseline-python imports: give it the Python of a virtualenv holding the older checkout
(each version's commit is recorded). Before the change, an iteration with a penalised
request was retired before the next was formed (no overlap for anyone in it) and the
penalties' counts were rebuilt from the host lists every step; after, neither. Each
measurement is its own process (one warm-up run first); passes interleave versions and
cases, so a drift of the shared machine lands on all of them; the medians and the best
tokens/s are reported, and, independent of the machine's load, how many iterations were
formed while the one before was still in flight (its batch reads pending tokens from the
device: the overlap async scheduling exists for).
Seeded sampling: each case must give the same tokens in both versions, checked.

On the CPU backend async scheduling overlaps only what releases the GIL (see
bench/studies/async_cpu.py), so what a forced retire costs here is smaller than on a GPU, where the
host's whole step hides behind the device's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys

CASES = (("async", 0), ("async", 1), ("sync", 1))       # (mode, penalised requests)
PENALTY = dict(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3)


def measure(model: str, mode: str, penalised: int, requests: int, max_tokens: int,
            batch_tokens: int) -> dict:
    """One run of `requests` seeded requests through an engine; the first `penalised` of
    them have PENALTY."""
    from nanorun import Engine, SamplingParams
    from nanorun.benchmark.loop import step_until_done

    engine = Engine(model, weights="random", max_batch_tokens=batch_tokens,
                    async_scheduling=mode == "async")
    overlapped = []         # iterations formed while the one before was still in flight
    run = engine.executor.run

    def counting_run(batch, *a, **kw):
        overlapped.append(batch.pending is not None)
        return run(batch, *a, **kw)

    engine.executor.run = counting_run
    for i in range(requests):
        pen = PENALTY if i < penalised else {}
        engine.add_request(str(i), [1 + i % 50] * (16 + 8 * (i % 8)), SamplingParams(
            max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True,
            **pen))
    done = step_until_done(engine)
    engine.shutdown()
    tokens, steps, wall = done.token_ids(), done.step_seconds, done.wall_s
    digest = hashlib.sha256(json.dumps(sorted(tokens.items())).encode()).hexdigest()[:16]
    return {"steps": len(steps), "overlapped_iterations": sum(overlapped),
            "iterations": len(overlapped), "wall_s": round(wall, 3),
            "steps_per_s": round(len(steps) / wall, 1),
            "step_ms_median": round(1e3 * statistics.median(steps), 2),
            "tokens_per_s": round(sum(map(len, tokens.values())) / wall, 1),
            "tokens_sha256": digest}


def worker(args) -> int:
    """One measurement in this process, as one JSON line on stdout."""
    import torch

    torch.set_num_threads(args.threads)
    from nanorun.benchmark.environment import git_commit

    measure(args.model, args.mode, args.penalised, 4, 4, args.max_batch_tokens)   # warm-up
    out = measure(args.model, args.mode, args.penalised, args.requests, args.max_tokens,
                  args.max_batch_tokens)
    commit, dirty = git_commit()
    print(json.dumps({**out, "git_commit": commit, "git_dirty": dirty}), flush=True)
    return 0


def run_worker(python: str, args, mode: str, penalised: int) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", "--mode", mode,
           "--penalised", str(penalised), "--model", args.model,
           "--requests", str(args.requests), "--max-tokens", str(args.max_tokens),
           "--max-batch-tokens", str(args.max_batch_tokens), "--threads", str(args.threads)]
    # Outside any checkout: each interpreter imports its own installed nanorun.
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(
        os.path.abspath(__file__)))
    if done.returncode:
        raise SystemExit(f"{mode} with {penalised} penalised failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_note(before: list[float], after: list[float]) -> str:
    """What the load averages say about the timings (the overlap counts do not depend on
    them)."""
    cores = os.cpu_count() or 1
    if max(before + after) > cores / 2:
        return (f"load average up to {max(before + after):.2f} on {cores} cores: other work "
                f"shared the machine, the timings are noisy (see the spread in runs); the "
                f"overlapped_iterations and same_tokens are not affected")
    return f"load average at most {max(before + after):.2f} on {cores} cores"


def summarise(runs: list[dict]) -> dict:
    return {"passes": len(runs),
            **{name: statistics.median(r[k] for r in runs)
               for k, name in (("steps_per_s", "steps_per_s_median"),
                               ("tokens_per_s", "tokens_per_s_median"),
                               ("step_ms_median", "step_ms_median"))},
            "tokens_per_s_best": max(r["tokens_per_s"] for r in runs),
            "steps": sorted({r["steps"] for r in runs}),
            "overlapped_iterations": sorted({r["overlapped_iterations"] for r in runs}),
            "iterations": sorted({r["iterations"] for r in runs}),
            "git_commit": runs[0]["git_commit"], "git_dirty": runs[0]["git_dirty"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-python", default=None,
                    help="the Python whose nanorun is the 'before' version (omit: after only)")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch-tokens", type=int, default=256)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    ap.add_argument("--out", default="bench/results/cpu/penalties_async.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="async", help=argparse.SUPPRESS)
    ap.add_argument("--penalised", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    from nanorun.benchmark.environment import write_result

    versions = {"after": sys.executable}
    if args.baseline_python:
        versions = {"before": args.baseline_python, **versions}
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list]] = {v: {f"{m}_{p}": [] for m, p in CASES} for v in versions}
    for _ in range(args.passes):
        for mode, penalised in CASES:
            for version, python in versions.items():
                r = run_worker(python, args, mode, penalised)
                runs[version][f"{mode}_{penalised}"].append(r)
                print(version, mode, penalised, json.dumps(r), flush=True)
    results = {v: {case: summarise(rs) for case, rs in cases.items()}
               for v, cases in runs.items()}
    for case in runs["after"]:
        digests = {r["tokens_sha256"] for v in runs for r in runs[v][case]}
        if len(digests) != 1:
            raise SystemExit(f"{case}: the tokens differ between runs or versions: {digests}")
    for v, cases in results.items():
        cases["async_1_over_async_0_tokens_per_s"] = round(
            cases["async_1"]["tokens_per_s_median"] / cases["async_0"]["tokens_per_s_median"], 3)
    load_after = os.getloadavg()
    doc = {
        "what": "async engine, seeded sampling, N requests with 0 or 1 penalised "
                "(async_0, async_1), and the sync engine with 1 (sync_1) for reference; "
                "overlapped_iterations: iterations formed before the previous one was read "
                "back (out of iterations); "
                "before: the penalised iteration retired before the next was formed, with "
                "counts rebuilt on the host each step; after: counts on the device",
        "model": args.model, "requests": args.requests, "max_tokens": args.max_tokens,
        "max_batch_tokens": args.max_batch_tokens, "torch_threads": args.threads,
        "penalty": PENALTY,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "load": load_note([round(x, 2) for x in load_before],
                          [round(x, 2) for x in load_after]),
        "results": results,
        "same_tokens": True,
        "runs": runs,
    }
    write_result(doc, args.out,
                 argv=None if argv is None else ["bench/studies/penalties_async.py", *argv])
    for v, cases in results.items():
        print(v, {c: (s if not isinstance(s, dict) else s["tokens_per_s_median"])
                  for c, s in cases.items()})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
