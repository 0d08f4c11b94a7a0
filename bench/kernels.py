"""Speed of nanorun's CUDA kernels against their torch reference implementations.

For every case: the median time of the CUDA kernel (CUDA events, after warm-up), the bytes it
must move (each input read once, each output written once) as GB/s and as a share of this
device's copy bandwidth (a large device-to-device copy, measured in the same run, bytes read +
written), TFLOP/s where arithmetic matters (prefill attention), the torch reference's median
time, and the kernel's max error against that reference (a sanity check, not the test suite).

    python bench/kernels.py [--out PATH] [--only SUBSTRING] [--repeats N] [--warmup N]

Writes JSON (default bench/results/<gpu>/kernels-<date>.json) with the command, date, git commit,
device, driver, torch and CUDA versions. The issue's target: decode attention at 256 sequences x
2048 context, bf16, head dim 128, group 8 (64 query / 8 kv heads) reaching >= 80 % of the copy
bandwidth, and >= 45 % with a CTA budget of half the SMs. A GPU session runs, from the repo root:

    pip install --no-build-isolation --no-deps -e . && \\
    python -m pytest -q tests/test_cuda_ops.py tests/test_cuda_attention.py && \\
    python bench/kernels.py --out "$OUT/kernels.json"

Needs a CUDA device and nanorun._cuda; without them it exits with a message (status 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


@dataclass
class Result:
    kernel: str
    case: str
    params: dict
    median_ms: float
    bytes: int
    flops: int = 0
    reference_ms: float | None = None
    max_abs_err: float | None = None
    extra: dict = field(default_factory=dict)

    def row(self, copy_gbs: float) -> dict:
        gbs = self.bytes / self.median_ms / 1e6
        row = dict(kernel=self.kernel, case=self.case, params=self.params,
                   median_ms=round(self.median_ms, 4), gb_per_s=round(gbs, 1),
                   share_of_copy_bandwidth=round(gbs / copy_gbs, 3), bytes=self.bytes)
        if self.flops:
            row["tflop_per_s"] = round(self.flops / self.median_ms / 1e9, 1)
        if self.reference_ms is not None:
            row["reference_ms"] = round(self.reference_ms, 4)
            row["speedup_vs_reference"] = round(self.reference_ms / self.median_ms, 2)
        if self.max_abs_err is not None:
            row["max_abs_err_vs_reference"] = self.max_abs_err
        row.update(self.extra)
        return row


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median of `repeats` event-timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth_gbs(warmup: int, repeats: int) -> float:
    """Device-to-device copy of 1 GiB, counting bytes read + written."""
    src = torch.randn(GIB // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup, repeats)
    return 2 * GIB / ms / 1e6


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_ids: torch.Tensor
    positions: torch.Tensor
    runs: list  # (cached, new) per sequence

    def args(self, scale: float):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_ids,
                self.positions, scale)


def make_batch(runs, heads, kv_heads, head_dim, dtype, page_size=16, seed=0) -> Batch:
    """Random q and cache; each sequence's pages a random (non-contiguous) set."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    pages_per_seq = [-(-(cached + new) // page_size) for cached, new in runs]
    num_pages = sum(pages_per_seq)
    order = torch.randperm(num_pages, generator=g, device="cuda").int()
    block_tables = torch.full((len(runs), max(pages_per_seq)), -1, dtype=torch.int32,
                              device="cuda")
    used = 0
    for s, n in enumerate(pages_per_seq):
        block_tables[s, :n] = order[used:used + n]
        used += n
    cache_shape = (num_pages, page_size, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=g, device="cuda", dtype=dtype)
    v_cache = torch.randn(cache_shape, generator=g, device="cuda", dtype=dtype)
    seq_ids = torch.cat([torch.full((new,), s, dtype=torch.int32) for s, (_, new) in
                         enumerate(runs)]).cuda()
    positions = torch.cat([torch.arange(cached, cached + new) for cached, new in runs]).cuda()
    q = torch.randn(len(positions), heads, head_dim, generator=g, device="cuda", dtype=dtype)
    return Batch(q, k_cache, v_cache, block_tables, seq_ids, positions, list(runs))


def attention_cost(b: Batch) -> tuple[int, int]:
    """(bytes, flops): every visible K/V row read once per sequence, q read, out written; 4 flops
    per (query head, visible position, dim) for Q K^T and P V."""
    kv_heads, head_dim = b.k_cache.shape[2], b.k_cache.shape[3]
    heads = b.q.shape[1]
    elem = b.q.element_size()
    contexts = sum(cached + new for cached, new in b.runs)
    visible = sum(new * cached + new * (new + 1) // 2 for cached, new in b.runs)
    bytes_ = 2 * contexts * kv_heads * head_dim * elem + 2 * b.q.numel() * elem
    return bytes_, 4 * heads * head_dim * visible


def bench_attention(name: str, runs, heads, kv_heads, head_dim, args, *, cta_budget=None,
                    reference=True) -> Result:
    from nanorun import cuda_ops
    from nanorun.kernels import WORKSPACE_FLOATS
    from nanorun.ops import paged_attention_torch

    b = make_batch(runs, heads, kv_heads, head_dim, torch.bfloat16)
    scale = head_dim ** -0.5
    out = torch.empty_like(b.q)
    workspace = torch.empty(WORKSPACE_FLOATS, dtype=torch.float32, device="cuda")
    plan = cuda_ops.paged_attention_plan(*b.args(scale), out, None, cta_budget, workspace)
    run = lambda: cuda_ops.paged_attention(*b.args(scale), out, None, cta_budget,  # noqa: E731
                                           workspace)
    ms = median_ms(run, args.warmup, args.repeats)
    bytes_, flops = attention_cost(b)
    result = Result("paged_attention", name,
                    dict(seqs=len(runs), tokens=b.q.shape[0], heads=heads, kv_heads=kv_heads,
                         head_dim=head_dim, dtype="bfloat16", cta_budget=cta_budget), ms, bytes_,
                    flops, extra=dict(splits=plan.splits, grid=plan.grid))
    if reference:
        ref = torch.empty_like(b.q)
        ref_run = lambda: paged_attention_torch(*b.args(scale), ref)  # noqa: E731
        result.reference_ms = median_ms(ref_run, 1, max(3, args.repeats // 10))
        run()
        result.max_abs_err = float((out.float() - ref.float()).abs().max())
    return result


# ---------------------------------------------------------------------------------------------
# The small memory-bound kernels
# ---------------------------------------------------------------------------------------------


def bench_elementwise(args) -> list[Result]:
    from nanorun import cuda_ops
    from nanorun.models.llama import apply_rope, rms_norm
    from nanorun.ops import kv_append

    dt, eps, tokens, hidden, inter = torch.bfloat16, 1e-5, 8192, 8192, 14336
    elem = torch.empty((), dtype=dt).element_size()
    results = []

    def add(kernel, case, params, fn, bytes_, ref_fn, max_err):
        ms = median_ms(fn, args.warmup, args.repeats)
        ref_ms = median_ms(ref_fn, args.warmup, args.repeats)
        results.append(Result(kernel, case, params, ms, bytes_, reference_ms=ref_ms,
                              max_abs_err=max_err))

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max())

    x = torch.randn(tokens, hidden, device="cuda", dtype=dt)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device="cuda", dtype=dt)
    out = torch.empty_like(x)
    add("rms_norm", f"{tokens}x{hidden}", dict(tokens=tokens, hidden=hidden),
        lambda: cuda_ops.rms_norm(x, weight, eps, out=out), 2 * x.numel() * elem,
        lambda: rms_norm(x, weight, eps),
        err(cuda_ops.rms_norm(x, weight, eps), rms_norm(x, weight, eps)))

    x_once, res_once = x.clone(), residual.clone()
    cuda_ops.fused_add_rms_norm(x_once, res_once, weight, eps)
    fused_err = err(x_once, rms_norm(x + residual, weight, eps))
    # Timed in place on copies: each call re-adds into the residual, like consecutive layers.
    add("fused_add_rms_norm", f"{tokens}x{hidden}", dict(tokens=tokens, hidden=hidden),
        lambda: cuda_ops.fused_add_rms_norm(x_once, res_once, weight, eps),
        4 * x.numel() * elem, lambda: rms_norm(x + residual, weight, eps), fused_err)
    del x, residual, out, x_once, res_once

    gate_up = torch.randn(tokens, 2 * inter, device="cuda", dtype=dt)
    act = torch.empty(tokens, inter, device="cuda", dtype=dt)

    def silu_ref():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    add("silu_and_mul", f"{tokens}x{inter}", dict(tokens=tokens, intermediate=inter),
        lambda: cuda_ops.silu_and_mul(gate_up, out=act), 3 * act.numel() * elem, silu_ref,
        err(cuda_ops.silu_and_mul(gate_up), silu_ref()))
    del gate_up, act

    heads, kv_heads, head_dim, max_len = 32, 8, 128, 8192
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dt)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    positions = torch.randint(0, max_len, (tokens,), device="cuda")
    angles = torch.outer(torch.arange(max_len, device="cuda", dtype=torch.float32),
                         torch.rand(head_dim // 2, device="cuda"))
    cos, sin = angles.cos(), angles.sin()
    rotated, reference = qk.clone(), qk.clone()
    cuda_ops.rotary_embedding(rotated, positions, cos, sin)
    apply_rope(reference, cos[positions], sin[positions])  # rounds cos/sin to bf16 first
    add("rotary_embedding", f"{tokens} tokens, {heads}+{kv_heads} heads",
        dict(tokens=tokens, heads=heads + kv_heads, head_dim=head_dim),
        lambda: cuda_ops.rotary_embedding(qk, positions, cos, sin),
        2 * qk.numel() * elem + 2 * tokens * head_dim // 2 * 4,
        lambda: apply_rope(qk, cos[positions], sin[positions]), err(rotated, reference))

    page_size = 16
    num_pages = tokens // page_size * 2
    k_cache = torch.randn(num_pages, page_size, kv_heads, head_dim, device="cuda", dtype=dt)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_pages * page_size, device="cuda")[:tokens]
    key = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    value = qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    cuda_ops.kv_append(key, value, k_cache, v_cache, slots)
    kv_append(key, value, k_ref, v_ref, slots)
    add("kv_append", f"{tokens} tokens, {kv_heads} kv heads",
        dict(tokens=tokens, kv_heads=kv_heads, head_dim=head_dim),
        lambda: cuda_ops.kv_append(key, value, k_cache, v_cache, slots),
        4 * key.numel() * elem + 8 * tokens,
        lambda: kv_append(key, value, k_ref, v_ref, slots),
        max(err(k_cache, k_ref), err(v_cache, v_ref)))
    return results


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def attention_cases(sms: int):
    """(name, runs, heads, kv_heads, head_dim, cta_budget, reference?)"""
    target = [(2047, 1)] * 256  # 256 sequences whose new token is position 2047: 2048 context
    return [
        ("decode 256x2048, group 8 (issue target)", target, 64, 8, 128, None, True),
        (f"decode 256x2048, group 8, cta_budget={sms // 2} (half the SMs)", target, 64, 8, 128,
         sms // 2, False),
        ("decode 256x2048, group 4 (Llama-3-8B heads)", target, 32, 8, 128, None, False),
        ("decode 8x32768, group 8 (split-KV)", [(32767, 1)] * 8, 64, 8, 128, None, True),
        ("prefill 4 chunks of 512 at context 1536", [(1536, 512)] * 4, 32, 8, 128, None, True),
        ("mixed: 192 decode at 2048 + chunk of 768 at 1024",
         [(2047, 1)] * 192 + [(1024, 768)], 32, 8, 128, None, False),
    ]


def device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True,
                                check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        driver = "unknown"
    return dict(name=props.name, multiprocessors=props.multi_processor_count,
                memory_gib=round(props.total_memory / GIB, 1), driver=driver,
                torch=torch.__version__, cuda=torch.version.cuda)


def default_out(device_name: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return REPO / "bench" / "results" / slug / f"kernels-{datetime.date.today().isoformat()}.json"


def missing_gpu() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    from nanorun import cuda_ops

    if not torch.cuda.is_available():
        return ("bench/kernels.py needs a CUDA device; torch sees none (torch "
                f"{torch.__version__}, CUDA {torch.version.cuda}). Run it on a GPU machine.")
    if not cuda_ops.available():
        return ("bench/kernels.py needs nanorun._cuda: rebuild with nvcc on PATH "
                "(NANORUN_CUDA=ON pip install --no-build-isolation --no-deps -e .)")
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/<gpu>/"
                                                 "kernels-<date>.json)")
    parser.add_argument("--only", default="", help="run only cases whose kernel or case name "
                                                   "contains this")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    args = parser.parse_args(argv)
    problem = missing_gpu()
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)

    device = device_info()
    copy_gbs = copy_bandwidth_gbs(args.warmup, args.repeats)
    print(f"{device['name']}: {device['multiprocessors']} SMs, copy bandwidth {copy_gbs:.0f} GB/s")

    results = []
    for name, runs, heads, kv_heads, head_dim, budget, ref in attention_cases(
            device["multiprocessors"]):
        if args.only in f"paged_attention {name}":
            results.append(bench_attention(name, runs, heads, kv_heads, head_dim, args,
                                           cta_budget=budget, reference=ref))
            print(json.dumps(results[-1].row(copy_gbs)))
    if any(args.only in k for k in ("rms_norm", "fused_add_rms_norm", "silu_and_mul",
                                    "rotary_embedding", "kv_append")):
        for r in bench_elementwise(args):
            if args.only in f"{r.kernel} {r.case}":
                results.append(r)
                print(json.dumps(r.row(copy_gbs)))

    from nanorun.benchmark.environment import write_result
    report = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device,
        copy_bandwidth_gb_per_s=round(copy_gbs, 1),
        method="CUDA events, median of --repeats calls after --warmup; bytes = each input read "
               "once + each output written once; copy bandwidth = 1 GiB device-to-device copy, "
               "read + written bytes",
        settings=dict(repeats=args.repeats, warmup=args.warmup, only=args.only),
        results=[r.row(copy_gbs) for r in results])
    out = args.out or default_out(device["name"])
    report = write_result(report, out, device="cuda")
    print(f"\n{'kernel':<20} {'case':<52} {'ms':>8} {'GB/s':>7} {'copy%':>6} {'ref ms':>8}")
    for row in report["results"]:
        print(f"{row['kernel']:<20} {row['case'][:52]:<52} {row['median_ms']:>8.3f} "
              f"{row['gb_per_s']:>7.0f} {100 * row['share_of_copy_bandwidth']:>5.0f}% "
              f"{row.get('reference_ms', math.nan):>8.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
