"""Where does the torch (SDPA) path overtake the numba kernel for a run of tokens on the CPU?

For one sequence with `context` tokens already cached, time a chunk of `run` new query tokens
through paged_attention_numba and paged_attention_torch (float32, the public functions, so
validation is included). The smallest run length at which torch wins is the dispatcher's
PREFILL_RUN_THRESHOLD. Also times whole decode batches, for reference.

    python bench/studies/cpu_attention.py [--out results.json] [--repeats 15]

Prints median milliseconds per call; --out also writes them as JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from nanorun.ops import paged_attention_numba, paged_attention_torch

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16


def make_inputs(seq_lens_and_runs: list[tuple[int, int]], seed: int = 0):
    """One row per sequence: (tokens already cached, new query tokens). Pages are shuffled."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-(ctx + run) // PAGE_SIZE) for ctx, run in seq_lens_and_runs]
    num_pages = sum(pages_per_seq)
    k_cache = torch.randn(num_pages, PAGE_SIZE, KV_HEADS, HEAD_DIM, generator=gen)
    v_cache = torch.randn(num_pages, PAGE_SIZE, KV_HEADS, HEAD_DIM, generator=gen)
    perm = torch.randperm(num_pages, generator=gen).int()
    block_tables = torch.full((len(pages_per_seq), max(pages_per_seq)), -1, dtype=torch.int32)
    seq_ids, positions, used = [], [], 0
    for s, ((ctx, run), n) in enumerate(zip(seq_lens_and_runs, pages_per_seq)):
        block_tables[s, :n] = perm[used:used + n]
        used += n
        seq_ids += [s] * run
        positions += range(ctx, ctx + run)
    q = torch.randn(len(seq_ids), HEADS, HEAD_DIM, generator=gen)
    return (q, k_cache, v_cache, block_tables, torch.tensor(seq_ids, dtype=torch.int32),
            torch.tensor(positions, dtype=torch.int64), HEAD_DIM ** -0.5, torch.empty_like(q))


def median_ms(fn, args, repeats: int) -> float:
    fn(*args)  # warm-up (JIT, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the results as JSON to this path")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()

    results = {"config": dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                              page_size=PAGE_SIZE, torch_threads=torch.get_num_threads(),
                              torch=torch.__version__),
               "chunk": [], "decode_batch": []}
    print(f"chunk of `run` tokens after `context` cached ones (median ms, {args.repeats} runs)")
    print(f"{'context':>8} {'run':>5} {'numba':>9} {'torch':>9}  faster")
    for context in (512, 2048):
        for run in (1, 2, 4, 8, 12, 16, 24, 32, 64):
            inputs = make_inputs([(context, run)])
            numba_ms = median_ms(paged_attention_numba, inputs, args.repeats)
            torch_ms = median_ms(paged_attention_torch, inputs, args.repeats)
            results["chunk"].append(dict(context=context, run=run, numba_ms=numba_ms,
                                         torch_ms=torch_ms))
            print(f"{context:>8} {run:>5} {numba_ms:>9.2f} {torch_ms:>9.2f}  "
                  f"{'numba' if numba_ms < torch_ms else 'torch'}")

    print("\ndecode batch: `batch` sequences, one token each (median ms)")
    print(f"{'context':>8} {'batch':>5} {'numba':>9} {'torch':>9}")
    for context, batch in ((512, 8), (512, 32), (2048, 8)):
        inputs = make_inputs([(context + 7 * s, 1) for s in range(batch)])
        numba_ms = median_ms(paged_attention_numba, inputs, args.repeats)
        torch_ms = median_ms(paged_attention_torch, inputs, args.repeats)
        results["decode_batch"].append(dict(context=context, batch=batch, numba_ms=numba_ms,
                                            torch_ms=torch_ms))
        print(f"{context:>8} {batch:>5} {numba_ms:>9.2f} {torch_ms:>9.2f}")

    crossover = {c: min((r["run"] for r in results["chunk"]
                         if r["context"] == c and r["torch_ms"] < r["numba_ms"]), default=None)
                 for c in (512, 2048)}
    results["crossover_run_length"] = crossover
    print(f"\nsmallest run length where torch wins: {crossover}")
    if args.out:
        from nanorun.benchmark.environment import write_result
        write_result(results, args.out)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
