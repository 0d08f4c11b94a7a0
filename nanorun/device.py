"""Device specs: what the runtime validates layouts against and names tuned layouts by, and
what the cost model (nanorun.search) starts from. They live in the runtime, below both, so
the search reads them from here and the runtime never imports the search.

Figures are the vendors' published dense (no sparsity) peaks; a measured profile (nanorun
profile, on a lent GPU) overrides them. SM partition granularity is what green contexts grant
in one step (minSmPartitionSize / smCoscheduledAlignment); the CUDA backend reads the real value
at run time and the layout validator uses this one offline.

Collectives are priced from measurements, not from the link's line rate: each spec carries
`CollectiveTable`s, NCCL's time against message size at each tensor-parallel degree, from
published benchmark data (the provenance is on each table). `collective_seconds` interpolates
them in log-log, holds the small-message latency floor below the first point and extends the
last point's bus bandwidth beyond the last; a tp without a table is read off the nearest
measured tp at the same bus bytes (nccl-tests' busbw, which is defined so that it does not
depend on the number of ranks: doc/PERFORMANCE.md of NVIDIA/nccl-tests).
"""

from __future__ import annotations

import bisect
import difflib
import logging
import math
import re
from dataclasses import dataclass, field, replace

import torch

logger = logging.getLogger("nanorun")


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


@dataclass(frozen=True)
class CollectiveTable:
    """Measured time of one collective at one tensor-parallel degree against message size.

    `nbytes` is the message as nccl-tests counts it: the all-reduce buffer, all-gather's
    gathered output, reduce-scatter's full input. `channels` is how many CTAs (NCCL channels)
    NCCL ran with when it was measured, so that a tighter CTA bound can be priced."""

    collective: str
    tp: int
    nbytes: tuple[int, ...]
    seconds: tuple[float, ...]
    channels: int
    source: str

    def __post_init__(self) -> None:
        if self.collective not in COLLECTIVES or self.tp < 2 or not self.nbytes \
                or len(self.nbytes) != len(self.seconds) \
                or list(self.nbytes) != sorted(set(self.nbytes)) \
                or list(self.seconds) != sorted(self.seconds) or min(self.seconds) <= 0:
            raise ValueError(f"collective table {self.collective} tp={self.tp}: sizes must "
                             f"ascend and times be positive and non-decreasing")

    @property
    def floor_s(self) -> float:
        """The small-message latency floor: the time of the smallest measured message."""
        return self.seconds[0]

    def seconds_at(self, nbytes: float) -> float:
        """Log-log interpolation; the floor below the first point; beyond the last, the last
        point's bandwidth (time grows linearly with bytes past the floor)."""
        sizes, times = self.nbytes, self.seconds
        if nbytes <= sizes[0]:
            return times[0]
        if nbytes >= sizes[-1]:
            return times[0] + (times[-1] - times[0]) * nbytes / sizes[-1]
        i = bisect.bisect_right(sizes, nbytes) - 1
        w = math.log(nbytes / sizes[i]) / math.log(sizes[i + 1] / sizes[i])
        return math.exp(math.log(times[i]) * (1 - w) + math.log(times[i + 1]) * w)


def isotonic(values, weights=None) -> list[float]:
    """Weighted pool-adjacent-violators: the non-decreasing sequence closest to `values` in
    weighted least squares. Measured collective times are made monotone in message size with
    it (a larger message is never faster; what says otherwise is noise)."""
    weights = list(weights) if weights is not None else [1] * len(values)
    blocks: list[list[float]] = []   # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            b = blocks.pop()
            a = blocks[-1]
            a[0] = (a[0] * a[1] + b[0] * b[1]) / (a[1] + b[1])
            a[1] += b[1]
            a[2] += b[2]
    return [mean for mean, _, count in blocks for _ in range(int(count))]


def bus_factor(collective: str, tp: int) -> float:
    """Bytes each rank moves over the wire per message byte (nccl-tests' busbw factor):
    2 (tp - 1) / tp for all-reduce (a reduce-scatter then an all-gather), (tp - 1) / tp for
    all-gather and reduce-scatter."""
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; known: {', '.join(COLLECTIVES)}")
    return (2.0 if collective == "all_reduce" else 1.0) * (tp - 1) / tp


_US = 1e-6
_SIZES = tuple(2**k for k in range(15, 27))          # 32 KiB .. 64 MiB
# Vidur (microsoft/vidur, MIT; Copyright (c) Microsoft Corporation), files
# data/profiling/network/{a100_dgx,h100_dgx}/all_reduce.csv at commit 7d47513: NCCL all-reduce
# kernel device time of torch.distributed.all_reduce on fp16 buffers, one DGX node, eager,
# median of 10 back-to-back calls, at 2, 4 and 8 ranks. Each point below is the median of the
# measurements within half an octave of the size (sizes below 32 KiB have one measurement each
# and are left out: the first point is the latency floor), made non-decreasing by pool-
# adjacent-violators: `python bench/data/derive_collectives.py vidur/data/profiling/network`
# prints these tuples (bench/data/README.md). Eager kernel times include waiting for the last
# rank, as an iteration's all-reduce waits for the slowest rank's GEMM.
_VIDUR = "Vidur profiling data (github.com/microsoft/vidur @7d47513, MIT), " \
         "data/profiling/network/{}/all_reduce.csv; bench/data/derive_collectives.py"
_A100_AR = {   # microseconds at _SIZES
    2: (45.5, 45.5, 45.5, 45.5, 54.0, 58.0, 58.0, 66.0, 97.0, 133.5, 254.0, 382.0),
    4: (21.0, 21.0, 40.8, 40.8, 40.8, 60.2, 60.2, 90.0, 133.0, 196.0, 338.0, 518.0),
    8: (31.0, 37.0, 42.7, 42.7, 42.7, 63.0, 72.0, 101.0, 158.0, 250.5, 420.0, 617.0),
}
_H100_AR = {
    2: (25.8, 25.8, 25.8, 38.0, 41.0, 41.0, 42.0, 43.0, 47.0, 69.0, 141.0, 215.0),
    # Vidur's eager tp 4 and 8 points up to 4 MiB (39.7-45.0 and 27.0-56.0 us) carry rank skew
    # that CUDA-graph replay does not have: at tp 4 they exceed tp 8's. There, 0.5-4 MiB are
    # vLLM's CUDA-graph-captured pynccl (NCCL) times on 8 x H100, bf16, hidden 8192
    # (vllm-project/vllm#24111, benchmarks/kernels/benchmark_device_communicators.py: tp 4
    # 17/19/22/26/31/37 us and tp 8 28/30/32/34/46/54 us at 0.5/1/1.5/2/3/4 MiB), held flat
    # below 0.5 MiB (a smaller message is not slower), and Vidur's from 8 MiB on.
    4: (17.0, 17.0, 17.0, 17.0, 17.0, 19.0, 26.0, 37.0, 62.0, 87.0, 178.0, 274.0),
    8: (28.0, 28.0, 28.0, 28.0, 28.0, 30.0, 34.0, 54.0, 84.0, 111.0, 207.0, 303.5),
}
_VLLM = "tp 4 and 8 below 8 MiB: vLLM CUDA-graph pynccl times (vllm-project/vllm#24111); " \
        "the rest: "
# Channels NCCL runs a lone large collective with, i.e. what the tables above were measured
# with: 24 on an HGX A100 (the NCCL_DEBUG log in NVIDIA/nccl-tests#100, "Channel 23/24"); 16
# on Hopper NVSwitch (NCCL's own comment quoted in NVIDIA/nccl#1041, "NVLS should not need more
# than 16 channels to get peak BW").
_A100_CHANNELS, _H100_CHANNELS = 24, 16


def _tables(data, channels, source, sources=None) -> tuple[CollectiveTable, ...]:
    sources = sources or {}
    return tuple(CollectiveTable("all_reduce", tp, _SIZES, tuple(t * _US for t in us),
                                 channels, sources.get(tp, source))
                 for tp, us in sorted(data.items()))


def _pcie_all_reduce() -> tuple[CollectiveTable, ...]:
    """L40S (PCIe, no NVLink). No NCCL benchmark of L40S is at hand; two published figures on
    8 x RTX 4090 (the same AD102 chip on PCIe 4.0) bound it: the 8-byte all-reduce latency,
    42.1 us (nccl-tests output in NVIDIA/nccl#1530), and about 28 GB/s bus bandwidth for large
    messages (NVIDIA/nccl#1639: 8 x RTX 5090 reach 28 GB/s, 'little difference' from 8 x RTX
    4090; on PCIe the CPU's memory bandwidth bounds it). Between them the table is the alpha-
    beta line floor + bus bytes / 28 GB/s, so it is an estimate at 8 ranks, read off at the
    same bus bytes at 2 and 4."""
    floor, busbw, tp = 42.1e-6, 28e9, 8
    sizes = (8,) + tuple(2**k for k in range(12, 27, 2))
    return (CollectiveTable("all_reduce", tp, sizes,
                            tuple(floor + n * bus_factor("all_reduce", tp) / busbw
                                  for n in sizes), 16,
                            "estimate: floor from NVIDIA/nccl#1530 (8 x RTX 4090, PCIe), bus "
                            "bandwidth 28 GB/s from NVIDIA/nccl#1639"),)


_A100_TABLES = _tables(_A100_AR, _A100_CHANNELS, _VIDUR.format("a100_dgx"))
_H100_TABLES = _tables(_H100_AR, _H100_CHANNELS, _VIDUR.format("h100_dgx"),
                       {tp: _VLLM + _VIDUR.format("h100_dgx") for tp in (4, 8)})


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    sm_count: int | None              # None: not partitioned by SMs (the CPU backend)
    sm_granularity: int
    bf16_tflops: float                # dense tensor-core peak
    hbm_gbps: float                   # device memory bandwidth, GB/s
    interconnect_gbps: float          # per direction, GPU to GPU
    memory_gib: float
    # Measured collective times (empty: the cost model falls back to latency + ring formula).
    collectives: tuple[CollectiveTable, ...] = field(default=(), repr=False)

    def collective_table(self, collective: str, tp: int) -> CollectiveTable | None:
        """The table that prices `collective` at `tp`: its own at this tp, else the same
        collective's at the nearest measured tp, else all-reduce's (the caller converts at
        equal bus bytes); None when the spec has no tables."""
        if not self.collectives:
            return None
        own = [t for t in self.collectives if t.collective == collective] or \
            [t for t in self.collectives if t.collective == "all_reduce"]
        return min(own, key=lambda t: (abs(t.tp - tp), -t.tp))


def collective_seconds(device: DeviceSpec, collective: str, nbytes: float, tp: int, *,
                       ctas: int | None = None) -> float | None:
    """Measured-table time of one collective of `nbytes` over `tp` ranks on `device` (None if
    the spec has no tables). A table of another tp or collective is read at the message size
    with the same bus bytes. `ctas` bounds NCCL's CTAs (nanorun sets NCCL_MAX_CTAS): below the
    channels the table was measured with, the bandwidth part (time above the latency floor)
    stretches by channels / ctas, one channel being one CTA moving its share of the data."""
    if tp < 2:
        return 0.0
    table = device.collective_table(collective, tp)
    if table is None:
        return None
    equivalent = nbytes * bus_factor(collective, tp) / bus_factor(table.collective, table.tp)
    seconds = table.seconds_at(equivalent)
    if ctas is not None and ctas < table.channels:
        seconds = table.floor_s + (seconds - table.floor_s) * table.channels / ctas
    return seconds


DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("h100", sm_count=132, sm_granularity=8, bf16_tflops=989.4,
                       hbm_gbps=3350.0, interconnect_gbps=450.0, memory_gib=80.0,
                       collectives=_H100_TABLES),
    # HGX H200 has the same NVLink 4 links and third-generation NVSwitch as HGX H100, so its
    # collectives are priced by the H100 measurements (no H200 NCCL benchmark is at hand).
    "h200": DeviceSpec("h200", sm_count=132, sm_granularity=8, bf16_tflops=989.4,
                       hbm_gbps=4800.0, interconnect_gbps=450.0, memory_gib=141.0,
                       collectives=_H100_TABLES),
    "a100": DeviceSpec("a100", sm_count=108, sm_granularity=2, bf16_tflops=312.0,
                       hbm_gbps=2039.0, interconnect_gbps=300.0, memory_gib=80.0,
                       collectives=_A100_TABLES),
    "l40s": DeviceSpec("l40s", sm_count=142, sm_granularity=2, bf16_tflops=362.1,
                       hbm_gbps=864.0, interconnect_gbps=32.0, memory_gib=48.0,
                       collectives=_pcie_all_reduce()),
    # The CPU backend: streams are logical (ops run in dependency order), nothing to partition.
    "cpu": DeviceSpec("cpu", sm_count=None, sm_granularity=1, bf16_tflops=1.0,
                      hbm_gbps=50.0, interconnect_gbps=10.0, memory_gib=24.0),
}


def known_device(name: str) -> DeviceSpec | None:
    """The spec a device name names, None if none: a short name ("h100"), an alias
    ("H100-SXM") or the name CUDA reports ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"),
    matched word by word so that tuned layouts carry the same GPU name whoever made them."""
    for word in re.split(r"[^a-z0-9]+", name.lower()):
        if word in DEVICES:
            return DEVICES[word]
    return None


def get_device(name: str) -> DeviceSpec:
    """A spec by name ("h100", "h200", "a100", "l40s", "cpu"), as known_device() reads it."""
    spec = known_device(name)
    if spec is not None:
        return spec
    key = name.lower().replace("nvidia", "").strip()
    close = difflib.get_close_matches(key, DEVICES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown device {name!r}.{hint} Known: {', '.join(DEVICES)}")


def device_spec(device: torch.device) -> DeviceSpec:
    """The spec layouts are validated against, and whose name "auto" looks tuned layouts up
    by: the CPU, the known GPU the device's name names (h100, h200, a100, l40s), else one
    made from the device's properties. The SM count is always the device's own: an H100 PCIe
    (114 SMs) is named "h100" but is not partitioned like the 132-SM SXM part."""
    if device.type != "cuda":
        return get_device("cpu")
    name = torch.cuda.get_device_name(device)
    spec = known_device(name)
    props = torch.cuda.get_device_properties(device)
    if spec is not None:
        if spec.sm_count != props.multi_processor_count:
            logger.warning("%s has %d SMs, not the %d of the %s spec: layouts are validated "
                           "against %d", name, props.multi_processor_count, spec.sm_count,
                           spec.name, props.multi_processor_count)
            spec = replace(spec, sm_count=props.multi_processor_count)
        return spec
    return DeviceSpec(name.lower(), props.multi_processor_count, 8, 0.0, 0.0, 0.0,
                      props.total_memory / 2**30)
