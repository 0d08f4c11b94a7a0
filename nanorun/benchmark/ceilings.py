"""This device's measured ceilings, and the throughput bound they give.

A tokens/s figure says little until it is set against what the device can do. NanoFlow's
"optimal" bound is compute-only: a token costs 2 x (active parameters) FLOPs of GEMMs, so no
runtime serves more than gemm_rate / (2 x active params) tokens/s. The GEMM rate here is
measured in the same process just before the run (large square matmuls in the model's dtype,
median of timed repeats after warm-up), not read from a datasheet, so the percentage is against
what this device really reaches. The copy bandwidth (a large device-to-device copy, counting
bytes read plus bytes written) is recorded beside it, as the ceiling of memory-bound work.
On a CPU the same measurements run on the CPU, and the report says so (device "cpu").
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

# (matrix size, warm-up runs, timed runs, copy buffer bytes). The GPU sizes saturate an H100;
# the CPU ones keep the measurement to a second or so on two cores.
_GPU = (8192, 5, 20, 1 << 30)
_CPU = (1024, 2, 7, 64 << 20)


@dataclass(frozen=True)
class Ceilings:
    gemm_tflops: float      # median dense matmul rate, TFLOP/s
    gemm_dtype: str
    gemm_size: int          # the square matrices' side
    copy_gbps: float        # device-to-device copy, GB/s (reads + writes)


def measure(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """Time large matmuls and one large copy on `device`."""
    size, warmup, repeats, copy_bytes = _GPU if device.type == "cuda" else _CPU
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), device, warmup, repeats)
    tflops = 2 * size**3 / seconds / 1e12
    del a, b
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, warmup, repeats)
    gbps = 2 * copy_bytes / seconds / 1e9
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Ceilings(tflops, str(dtype).removeprefix("torch."), size, gbps)


def optimal_tokens_per_s(gemm_tflops: float, active_params_per_token: int) -> float:
    """NanoFlow's bound: GEMM FLOP/s over the 2 x active parameters each token costs."""
    return gemm_tflops * 1e12 / (2 * active_params_per_token)


def median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one call of `fn` on `device` after `warmup` calls (CUDA events on a
    GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        return _median_cuda_seconds(fn, device, repeats)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _median_cuda_seconds(fn, device: torch.device, repeats: int) -> float:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    with torch.cuda.device(device):
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3
