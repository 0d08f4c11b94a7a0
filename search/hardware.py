"""Device specs the layout validator and the cost model start from.

Figures are the vendors' published dense (no sparsity) peaks; a measured profile (nanorun
profile, on a lent GPU) overrides them. SM partition granularity is what green contexts grant
in one step (minSmPartitionSize / smCoscheduledAlignment); the CUDA backend reads the real value
at run time and the layout validator uses this one offline.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    sm_count: int | None              # None: not partitioned by SMs (the CPU backend)
    sm_granularity: int
    bf16_tflops: float                # dense tensor-core peak
    hbm_gbps: float                   # device memory bandwidth, GB/s
    interconnect_gbps: float          # per direction, GPU to GPU
    memory_gib: float


DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("h100", sm_count=132, sm_granularity=8, bf16_tflops=989.4,
                       hbm_gbps=3350.0, interconnect_gbps=450.0, memory_gib=80.0),
    "h200": DeviceSpec("h200", sm_count=132, sm_granularity=8, bf16_tflops=989.4,
                       hbm_gbps=4800.0, interconnect_gbps=450.0, memory_gib=141.0),
    "a100": DeviceSpec("a100", sm_count=108, sm_granularity=2, bf16_tflops=312.0,
                       hbm_gbps=2039.0, interconnect_gbps=300.0, memory_gib=80.0),
    "l40s": DeviceSpec("l40s", sm_count=142, sm_granularity=2, bf16_tflops=362.1,
                       hbm_gbps=864.0, interconnect_gbps=32.0, memory_gib=48.0),
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
