"""The issue-6 GPU benchmark: llama-3-8b (random bf16 weights), offline, on each shipped trace
(NanoFlow's filter) and on const:1024x512, tuned layout against "sequential" in the same run.

    python bench/gpu_traces.py [--model llama-3-8b] [--num-requests 1000] [--layout auto]
                               [--out-dir bench/results/<gpu>]

Writes one `nanorun bench` JSON (and figure) per workload under bench/results/<gpu>/, where
<gpu> is h100, h200, a100, ... from the device name, and prints each summary table. Targets:
total_token_throughput >= 80 % of the measured optimal bound, and the tuned layout >= 1.25x
sequential. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

from nanorun.cli import main as nanorun_main

WORKLOADS = ("azure-conv", "azure-code", "sharegpt", "lmsys", "const:1024x512")


def gpu_slug(name: str) -> str:
    """The results folder of a device: "NVIDIA H100 80GB HBM3" -> "h100"."""
    name = name.lower()
    match = re.search(r"\b([a-z]+\d+[a-z]*)\b", name.replace("nvidia", ""))
    return match.group(1) if match else re.sub(r"\W+", "-", name).strip("-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--max-batch-tokens", type=int, default=1024)
    parser.add_argument("--layout", default="auto")
    parser.add_argument("--out-dir", default=None, help="default: bench/results/<gpu>")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_traces.py needs a CUDA device", file=sys.stderr)
        return 2
    out_dir = args.out_dir or f"bench/results/{gpu_slug(torch.cuda.get_device_name())}"
    for workload in WORKLOADS:
        stem = workload.replace(":", "-")
        rc = nanorun_main([
            "bench", args.model, "--device", "cuda", "--weights", "random",
            "--trace", workload, "--num-requests", str(args.num_requests),
            "--max-batch-tokens", str(args.max_batch_tokens), "--layout", args.layout,
            "--result-json", f"{out_dir}/{stem}.json", "--plot", f"{out_dir}/{stem}.png",
            "--no-progress"])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
