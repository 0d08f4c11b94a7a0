"""The GPU session's attention figure: decode attention at 256 sequences x 2048 context (bf16,
head dim 128, 64 query / 8 KV heads: the issue-4 target) on all SMs, and on the attention
partition of Llama-3-8B's overlap layout: once on a plain stream with the partition's CTA
budget, once enqueued on the partition's own stream (a green context where the driver allows),
as the executor runs it. GB/s and the share of the copy bandwidth measured in the same process.

    python bench/gpu_attention.py [--device cuda] --out P

Timing: bench/kernels.py's (CUDA events, median of 50 calls after 5 warm-ups); bytes: every
K/V row read once per sequence, q read, out written. --device cpu (the rehearsal) times the
torch reference at 8 sequences x 256 context instead and writes the same fields.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGET = dict(seqs=256, context=2048, heads=64, kv_heads=8, head_dim=128)
REHEARSAL = dict(seqs=8, context=256, heads=8, kv_heads=2, head_dim=64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    cases = cuda_cases() if args.device == "cuda" else cpu_cases()
    report = {"device": args.device, **cases,
              "ok": all(c["median_ms"] > 0 and c["gb_per_s"] is not None
                        for c in cases["cases"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for c in report["cases"]:
        print(f"[gpu_attention] {c['case']}: {c.get('median_ms')} ms, {c.get('gb_per_s')} GB/s, "
              f"{c.get('share_of_copy_bandwidth')} of copy", flush=True)
    return 0 if report["ok"] else 1


def cuda_cases() -> dict:
    kernels = _kernels_module()
    from nanorun.backends import CudaStreams
    from nanorun.device import device_spec
    from nanorun.layout import overlap
    from nanorun.models import layer_ops

    problem = kernels.missing_gpu()
    if problem:
        raise SystemExit(problem)
    opts = argparse.Namespace(warmup=5, repeats=50)
    copy = kernels.copy_bandwidth_gbs(opts.warmup, opts.repeats)
    runs = [(TARGET["context"] - 1, 1)] * TARGET["seqs"]
    shape = (runs, TARGET["heads"], TARGET["kv_heads"], TARGET["head_dim"])
    layout = overlap(tuple(op.name for op in layer_ops(1)), 1024,
                     device_spec(torch.device("cuda")))
    streams = CudaStreams(layout, "cuda")
    attn = next(i for i, part in enumerate(streams.partitions) if part.name == "attn")
    budget = streams.partitions[attn].budget
    cases = []
    for name, cta_budget in (("all SMs", None), (f"attention partition's budget ({budget} SMs),"
                                                 f" plain stream", budget)):
        r = kernels.bench_attention(name, *shape, opts, cta_budget=cta_budget,
                                    reference=cta_budget is None)
        cases.append(_row(r.row(copy), name, cta_budget, "plain"))
    # The partition's own stream: what the executor's attention launches get.
    with torch.cuda.stream(streams.stream(attn)):
        r = kernels.bench_attention("attention partition's stream", *shape, opts,
                                    cta_budget=budget, reference=False)
    cases.append(_row(r.row(copy), "attention partition's stream", budget, streams.how))
    return {"target": TARGET, "copy_gbps": copy, "partitions": streams.summary,
            "cases": cases}


def _row(row: dict, name: str, budget, stream: str) -> dict:
    return {"case": name, "cta_budget": budget, "stream": stream,
            "median_ms": row["median_ms"], "gb_per_s": row["gb_per_s"],
            "share_of_copy_bandwidth": row["share_of_copy_bandwidth"], "bytes": row["bytes"],
            "max_abs_err_vs_reference": row.get("max_abs_err_vs_reference"),
            "splits": row.get("splits"), "grid": row.get("grid")}


def cpu_cases() -> dict:
    """The rehearsal: the torch reference on the CPU, timed with perf_counter."""
    from nanorun.benchmark.ceilings import measure
    from nanorun.ops import paged_attention_torch

    c = REHEARSAL
    g = torch.Generator().manual_seed(0)
    page = 16
    pages = c["seqs"] * (c["context"] // page)
    cache = (pages, page, c["kv_heads"], c["head_dim"])
    k, v = (torch.randn(cache, generator=g, dtype=torch.bfloat16) for _ in range(2))
    tables = torch.randperm(pages, generator=g).int().view(c["seqs"], -1)
    q = torch.randn(c["seqs"], c["heads"], c["head_dim"], generator=g, dtype=torch.bfloat16)
    seq_ids = torch.arange(c["seqs"], dtype=torch.int32)
    positions = torch.full((c["seqs"],), c["context"] - 1, dtype=torch.int64)
    out = torch.empty_like(q)
    args = (q, k, v, tables, seq_ids, positions, c["head_dim"] ** -0.5, out)
    times = []
    for i in range(8):
        t0 = time.perf_counter()
        paged_attention_torch(*args)
        if i >= 2:      # two warm-ups
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    nbytes = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()
    copy = measure(torch.device("cpu"), torch.float32).copy_gbps
    gbs = nbytes / ms / 1e6
    row = {"case": "all cores (torch reference)", "cta_budget": None, "stream": "cpu",
           "median_ms": round(ms, 4), "gb_per_s": round(gbs, 3),
           "share_of_copy_bandwidth": round(gbs / copy, 4), "bytes": nbytes,
           "max_abs_err_vs_reference": None, "splits": None, "grid": None}
    return {"target": c, "copy_gbps": copy, "partitions": None, "cases": [row]}


def _kernels_module():
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(main())
