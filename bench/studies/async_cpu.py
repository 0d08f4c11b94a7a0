"""Does async scheduling pay on the CPU backend? The same requests through Engine with
async_scheduling off and on, real model, one machine.

    python bench/studies/async_cpu.py [--model tiny-llama] [--requests 48] [--max-tokens 32]
                              [--passes 3] [--threads 1] [--out bench/results/cpu/async_cpu.json]

On the CPU, async scheduling runs each iteration's device work (the executor, the sampler's
tensor ops) on a worker thread (nanorun/backends/inflight.py) while the main thread
schedules and builds the next one. The two overlap only where the worker's work releases the
GIL: torch's kernels do while they compute; the executor's issue loop and every op's Python
dispatch do not. So what async wins here is bounded by the share of a step spent inside
kernels and by a second free core. Passes alternate sync then async, so a drift of the shared
machine lands on both; the median step time, tokens/s of each pass, and the median of the
paired ratios are written. Seeded sampling: both modes must give the same tokens, checked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch


def run(model: str, async_scheduling: bool, requests: int, max_tokens: int,
        batch_tokens: int) -> dict:
    from nanorun import Engine, SamplingParams
    from nanorun.benchmark.loop import step_until_done

    engine = Engine(model, weights="random", max_batch_tokens=batch_tokens,
                    async_scheduling=async_scheduling)
    for i in range(requests):
        engine.add_request(str(i), [1 + i % 50] * (16 + 8 * (i % 8)), SamplingParams(
            max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True))
    done = step_until_done(engine)
    engine.shutdown()
    tokens, wall = done.token_ids(), done.wall_s
    return {"wall_s": round(wall, 3), "steps": done.steps,
            "step_ms_median": round(1e3 * statistics.median(done.step_seconds), 2),
            "tokens_per_s": round(sum(map(len, tokens.values())) / wall, 1), "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-tokens", type=int, default=256)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    ap.add_argument("--out", default="bench/results/cpu/async_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nanorun.benchmark.environment import write_result

    load_before = os.getloadavg()
    run(args.model, False, 4, 4, args.max_batch_tokens)         # warm-up: first-use costs
    passes = []
    for _ in range(args.passes):
        pair = {mode: run(args.model, mode == "async", args.requests, args.max_tokens,
                          args.max_batch_tokens) for mode in ("sync", "async")}
        if pair["sync"].pop("tokens") != pair["async"].pop("tokens"):
            raise SystemExit("async scheduling changed the tokens")
        pair["step_ratio_async_over_sync"] = round(
            pair["async"]["step_ms_median"] / pair["sync"]["step_ms_median"], 3)
        passes.append(pair)
        print(json.dumps(pair), flush=True)
    doc = {
        "model": args.model, "requests": args.requests, "max_tokens": args.max_tokens,
        "max_batch_tokens": args.max_batch_tokens, "torch_threads": args.threads,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "passes": passes,
        "median_step_ratio_async_over_sync": statistics.median(
            p["step_ratio_async_over_sync"] for p in passes),
        "same_tokens": True,
    }
    write_result(doc, args.out,
                 argv=None if argv is None else ["bench/studies/async_cpu.py", *argv])
    print(f"wrote {args.out}: async/sync step time {doc['median_step_ratio_async_over_sync']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
