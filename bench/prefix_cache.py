"""What the prefix cache saves on multi-turn conversations (issue 28): prompt tokens computed,
hit rate, throughput and TTFT with the cache off, on, and on with a host-memory tier, side by
side in one run.

    python bench/prefix_cache.py [--model tiny-llama] [--trace lmsys] [--num-requests 48]
        [--turns 4] [--think-time 0.2] [--system-prompt-len 64] [--kv-cache-tokens 2048]
        [--kv-offload-tokens 16384] [--variants off on host] [--repeats 3]
        [--out bench/results/cpu/prefix_cache.json]

Every variant runs the same workload through `nanorun bench`'s runner (the same seeded
conversations, arrivals, step loop and metrics; `nanorun bench --turns` is the same workload
for one engine configuration), each pass in a fresh engine, passes interleaved (off, on, host,
off, on, host, ...) so a drift of the machine lands on all alike. Per variant: every pass's
figures, their min / median / max, and each pass's ratio to the cache-off pass beside it.

The KV cache is kept small on purpose (--kv-cache-tokens 2048, for 12 conversations whose
last turns reach about 1000 tokens): conversations then compete for pages, a finished turn's
pages are evicted during its think time, and what the host tier keeps (and copies back instead
of recomputing) shows. With a cache large enough for every conversation nothing is evicted,
and "on" and "host" are the same.
"""

from __future__ import annotations

import argparse
import sys

VARIANTS = {          # name: the EngineConfig fields that make it
    "off": {"enable_prefix_caching": False},
    "on": {"enable_prefix_caching": True},
    # None: the value of --kv-offload-tokens
    "host": {"enable_prefix_caching": True, "kv_offload_tokens": None},
}
FIGURES = ("prompt_tokens_computed", "prefix_cache_hit_rate", "total_token_throughput",
           "output_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "duration")
RATIOS = ("prompt_tokens_computed", "total_token_throughput", "mean_ttft_ms")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from nanorun.benchmark import ceilings
    from nanorun.benchmark.environment import write_result

    torch.set_num_threads(args.threads)
    measured = ceilings.measure(torch.device("cpu"), torch.float32)
    passes: dict[str, list[dict]] = {v: [] for v in args.variants}
    header = None
    for repeat in range(args.repeats):
        for variant in args.variants:
            report = one_pass(args, variant, measured)
            header = header or report["nanorun"]
            row = pass_figures(report["runs"][0])
            passes[variant].append(row)
            print(f"pass {repeat + 1} {variant:>5}: " + ", ".join(
                f"{k} {row[k]:.4g}" for k in FIGURES if row[k] is not None), flush=True)
    doc = {"what": __doc__.split("\n\n")[0].replace("\n", " "),
           "model": header["model"], "weights": header["weights"], "dtype": header["dtype"],
           "trace": header["trace"], "trace_source": header["trace_source"],
           "length_filter": header["length_filter"], "prefixes": header["prefixes"],
           "num_conversations": header["num_conversations"],
           "num_requests": header["num_requests"], "num_skipped": header["num_skipped"],
           "mean_prompt_len": header["mean_prompt_len"],
           "mean_output_len": header["mean_output_len"],
           "max_batch_tokens": header["max_batch_tokens"],
           "kv_cache_tokens": header["kv_cache_tokens"], "cpu_threads": header["cpu_threads"],
           "repeats": args.repeats,
           "variants": {v: summarise(v, passes, args) for v in args.variants}}
    write_result(doc, args.out,
                 argv=None if argv is None else ["bench/prefix_cache.py", *argv])
    print_table(doc)
    print(f"wrote {args.out}")
    return 0


def one_pass(args, variant: str, measured) -> dict:
    """One pass of the workload through a fresh engine of this variant: the bench report."""
    from nanorun.benchmark.report import build_report
    from nanorun.benchmark.runner import BenchConfig, run_benchmark
    from nanorun.benchmark.traces import parse_length_filter
    from nanorun.benchmark.workload import Prefixes

    config = BenchConfig(
        model=args.model, max_batch_tokens=args.max_batch_tokens,
        engine_options={"weights": "random", "kv_cache_tokens": args.kv_cache_tokens,
                        **engine_options(variant, args)},
        trace=args.trace, num_requests=args.num_requests,
        length_filter=parse_length_filter(args.filter), layouts=("sequential",),
        seed=args.seed, show_progress=False,
        prefixes=Prefixes(system_prompt_len=args.system_prompt_len, turns=args.turns,
                          think_time=args.think_time))
    return build_report(run_benchmark(config, measured=measured))


def engine_options(variant: str, args) -> dict:
    return {k: args.kv_offload_tokens if v is None else v for k, v in VARIANTS[variant].items()}


def pass_figures(run: dict) -> dict:
    """One pass's figures; a pass with a failed request is refused (its figures would not
    compare)."""
    if run["failed"]:
        first = next(e for e in run["errors"] if e)
        raise SystemExit(f"{run['failed']} requests failed ({first}): the variants would not "
                         f"compare; give the KV cache more tokens or shorter requests")
    return {k: run[k] for k in (*FIGURES, "completed", "total_input_tokens",
                                "total_cached_tokens")}


def summarise(variant: str, passes: dict[str, list[dict]], args) -> dict:
    from nanorun.benchmark.report import spread

    runs = passes[variant]
    out = {"engine_options": engine_options(variant, args), "passes": runs,
           **{k: spread([r[k] for r in runs]) for k in FIGURES
              if all(r[k] is not None for r in runs)}}
    if "off" in passes and variant != "off":
        out["ratio_to_off"] = {k: spread([r[k] / o[k] for r, o in zip(runs, passes["off"])])
                               for k in RATIOS if all(o[k] for o in passes["off"])}
    return out


def print_table(doc: dict) -> None:
    print(f"\n{'variant':>7}  {'prompt computed':>15}  {'hit %':>6}  {'tok/s':>14}  "
          f"{'TTFT ms':>15}  vs off (computed, tok/s, TTFT)")
    for name, v in doc["variants"].items():
        def med(k, fmt):
            s = v.get(k)
            return "-" if s is None else f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"
        ratios = v.get("ratio_to_off", {})
        vs = ", ".join(f"{ratios[k]['median']:.2f}x" for k in RATIOS if k in ratios)
        hit = v.get("prefix_cache_hit_rate")
        hit = "-" if hit is None else f"{100 * hit['median']:.1f}"
        print(f"{name:>7}  {v['prompt_tokens_computed']['median']:>15,.0f}  {hit:>6}  "
              f"{med('total_token_throughput', '.0f'):>14}  {med('mean_ttft_ms', '.0f'):>15}  "
              f"{vs}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--trace", default="lmsys")
    p.add_argument("--filter", default="256,128,384", help="per turn: see nanorun bench")
    p.add_argument("--num-requests", type=int, default=48, help="turns in all")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--think-time", type=float, default=0.2)
    p.add_argument("--system-prompt-len", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=256)
    p.add_argument("--kv-cache-tokens", type=int, default=2048)
    p.add_argument("--kv-offload-tokens", type=int, default=16384,
                   help="the host tier's size for the 'host' variant")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/cpu/prefix_cache.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
