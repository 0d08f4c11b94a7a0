"""Derive the all-reduce tables of nanorun/device.py from Vidur's published NCCL measurements.

    python bench/data/derive_collectives.py PATH/TO/vidur/data/profiling/network

Source: microsoft/vidur (MIT licence, Copyright (c) Microsoft Corporation), files
data/profiling/network/{a100_dgx,h100_dgx}/all_reduce.csv at commit
7d47513363ec447a741ac5e47241580b47724fbf (https://github.com/microsoft/vidur). Vidur's profiler
(vidur/profiling/collectives/) times torch.distributed.all_reduce on fp16 buffers on one DGX
A100 / DGX H100 node, eager (no CUDA graph), and records the NCCL kernel's device time from a
kineto trace (median of 10 back-to-back calls); `size` is the buffer in bytes, `num_workers` the
ranks. We keep the single-node rows (num_workers == devices_per_node) at 2, 4 and 8 ranks.

The raw points are noisy at small sizes (a kernel's device time includes waiting for the last
rank to arrive), so each table point is the median of the measured times within half an octave
of a power-of-two size (2 KiB to 64 MiB; bins of fewer than three measurements are dropped,
which leaves 32 KiB to 64 MiB, the smaller sizes each having one), and the points are then made non-decreasing in size by
weighted pool-adjacent-violators (a larger message is never faster; the weights are the number
of measurements pooled). Prints the Python literal pasted into nanorun/device.py; there, the
H100 tables at tp 4 and 8 take vLLM's CUDA-graph-captured NCCL times below 8 MiB instead
(vllm-project/vllm#24111; the comment at _H100_AR says why).
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

from nanorun.device import isotonic   # the same fit the profiler applies

SIZES = tuple(2048 * 2**k for k in range(16))          # 2 KiB .. 64 MiB
MIN_POINTS = 3   # a bin of fewer measurements is dropped: below 32 KiB each bin holds one


def table(path: Path, ranks: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    points = []
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["collective"] == "all_reduce" and int(row["num_workers"]) == ranks \
                    == int(row["devices_per_node"]):
                points.append((int(row["size"]), float(row["time_stats.all_reduce.median"])))
    sizes, medians, weights = [], [], []
    for s in SIZES:
        window = [t for n, t in points if s / 2**0.5 <= n < s * 2**0.5]
        if len(window) >= MIN_POINTS:
            sizes.append(s)
            medians.append(statistics.median(window))
            weights.append(len(window))
    fitted = isotonic(medians, weights)
    return tuple(sizes), tuple(round(t * 1e3, 1) for t in fitted)   # ms -> us


def main() -> int:
    root = Path(sys.argv[1])
    for device, folder in (("a100", "a100_dgx"), ("h100", "h100_dgx")):
        for ranks in (2, 4, 8):
            sizes, us = table(root / folder / "all_reduce.csv", ranks)
            print(f"# {device} tp={ranks}")
            print(f"    ({ranks}, {sizes},\n         {us}),")
    return 0


if __name__ == "__main__":
    sys.exit(main())
