"""What sharing a prompt's KV saves for n > 1: the same requests through a TextEngine as
requests of n sequences (sharing: the prompt is computed once, see nanorun.scheduler) and as
n separate requests per prompt with each sequence's own seed (not sharing: what nanorun did
before), CPU backend, random weights.

    python bench/studies/n_sharing.py [--model tiny-llama] [--requests 8] [--prompt-len 256]
                              [--max-tokens 16] [--ns 1,2,4,8] [--passes 3] [--threads 1]
                              [--out bench/results/cpu/n_sharing.json]

Per n and mode: the tokens whose KV was computed (all scheduled chunk lengths; the prompt's
share of them), the most KV pages held at once, and the wall time (median of the passes,
which alternate the modes so a drift of the shared machine lands on both). Both modes must
give the same tokens, checked. No preemption (the cache is sized for the unshared run), so
the prompt tokens computed are exactly requests * (P + n - 1) sharing and requests * n * P not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace

import torch


def run(model: str, n: int, share: bool, args) -> dict:
    from nanorun import Engine, SamplingParams, TextEngine
    from nanorun.benchmark.loop import step_until_done

    kv_tokens = args.requests * n * (args.prompt_len + args.max_tokens) + 1024
    engine = Engine(model, weights="random", max_batch_tokens=args.max_batch_tokens,
                    kv_cache_tokens=kv_tokens)
    te = TextEngine(engine, None)
    counts = {"computed": 0, "prompt": 0, "peak_pages": 0, "preempted": 0}
    schedule, kv = engine.scheduler.schedule, engine.kv_cache

    def counted():
        out = schedule()
        for c in out.chunks:
            counts["computed"] += c.length
            counts["prompt"] += max(0, min(c.start + c.length,
                                           len(c.request.prompt_token_ids)) - c.start)
        counts["peak_pages"] = max(counts["peak_pages"], kv.num_pages - kv.num_free_pages)
        counts["preempted"] += len(out.preempted)
        return out

    engine.scheduler.schedule = counted
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(n=n, max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=1,
                        ignore_eos=True)
    for r in range(args.requests):
        prompt = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
        if share:
            te.add_request(str(r), prompt, replace(sp, seed=1000 * r))
        else:
            for i in range(n):
                te.add_request(f"{r}.{i}", prompt, sequence_params(replace(sp, seed=1000 * r), i))
    done = step_until_done(te)
    tokens = {}
    for out in done.outputs.values():
        for c in out.outputs:
            key = (out.request_id, c.index) if share else (
                out.request_id.split(".")[0], int(out.request_id.split(".")[1]))
            tokens[f"{key[0]}.{key[1]}"] = c.token_ids
    wall = done.wall_s
    engine.shutdown()
    return {"wall_s": round(wall, 3), "tokens_computed": counts["computed"],
            "prompt_tokens_computed": counts["prompt"], "peak_kv_pages": counts["peak_pages"],
            "preempted": counts["preempted"], "tokens": tokens}


def sequence_params(sp, i: int):
    """What TextEngine gives sequence i of an n > 1 request: one sequence, seed + i."""
    return replace(sp, n=1, seed=None if sp.seed is None else sp.seed + i)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, default=256)
    ap.add_argument("--ns", default="1,2,4,8")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    ap.add_argument("--out", default="bench/results/cpu/n_sharing.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nanorun.benchmark.environment import write_result

    load_before = os.getloadavg()
    run(args.model, 2, True, argparse.Namespace(**{**vars(args), "requests": 1}))  # warm-up
    rows = []
    for n in map(int, args.ns.split(",")):
        passes = {"shared": [], "separate": []}
        for _ in range(args.passes):
            for mode in passes:
                passes[mode].append(run(args.model, n, mode == "shared", args))
        tokens = [p.pop("tokens") for runs in passes.values() for p in runs]
        if any(t != tokens[0] for t in tokens):
            raise SystemExit(f"n={n}: sharing changed the tokens")
        row = {"n": n}
        for mode, runs in passes.items():
            row[mode] = {**{k: v for k, v in runs[0].items() if k != "wall_s"},
                         "wall_s_median": statistics.median(r["wall_s"] for r in runs),
                         "wall_s": [r["wall_s"] for r in runs]}
        row["wall_ratio_shared_over_separate"] = round(
            row["shared"]["wall_s_median"] / row["separate"]["wall_s_median"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {
        "model": args.model, "requests": args.requests, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "max_batch_tokens": args.max_batch_tokens,
        "passes": args.passes, "torch_threads": args.threads,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "rows": rows, "same_tokens": True,
    }
    write_result(doc, args.out,
                 argv=None if argv is None else ["bench/studies/n_sharing.py", *argv])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
