"""What an engine will allocate, estimated before it allocates anything.

A model that cannot fit must fail with a message saying what to lower, not be killed by the
kernel half-way through loading (a fp32 Llama-3-8B is 32 GB) or die in a pybind TypeError when a
size overflows the page allocator's int32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .models import ModelConfig, family

# Page ids are int32 in the C++ allocator and in the page tables the kernels read.
MAX_KV_PAGES = (1 << 31) - 1
_GIB = 1 << 30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs: its weights, its KV cache, and the activation workspace."""

    weights: int
    kv_cache: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace

    def describe(self) -> str:
        return (f"{gib(self.total)} (weights {gib(self.weights)}, KV cache "
                f"{gib(self.kv_cache)}, workspace {gib(self.workspace)})")


def gib(nbytes: float) -> str:
    return f"{nbytes / _GIB:.2f} GiB"


def estimate(mc: ModelConfig, dtype: torch.dtype, *, max_batch_tokens: int, kv_tokens: int,
             max_model_len: int) -> MemoryEstimate:
    """mc: the rank's own (sharded) config. kv_tokens: KV cache capacity in tokens."""
    elt = torch.empty((), dtype=dtype).element_size()
    # The family's workspace rows (its model class says what they hold) plus fp32 logits,
    # which a prompt_logits call takes for every row of the batch.
    per_token = family(mc).workspace_bytes_per_token(mc, elt) + 4 * mc.vocab_size
    rope_tables = 2 * max_model_len * (mc.head_dim // 2) * 4
    return MemoryEstimate(
        weights=mc.num_params * elt,
        kv_cache=kv_tokens * mc.kv_bytes_per_token(elt),
        workspace=max_batch_tokens * per_token + rope_tables,
    )


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this engine: the GPU's free memory, or the host's MemAvailable. None
    where the platform does not say (the check is then skipped)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need: MemoryEstimate, device: torch.device, dtype: torch.dtype, *,
               what: str) -> None:
    """Raise ValueError, saying what to lower, unless `need` fits in what the device has free."""
    have = available_bytes(device)
    if have is None or need.total <= have:
        return
    hints = []
    if need.weights > 0.5 * have:
        if dtype == torch.float32:
            hints.append("dtype='bfloat16' (half the weights' float32 bytes)")
        hints.append("a smaller model")
        if device.type == "cuda":
            hints.append("tensor_parallel_size > 1 (splits the weights over GPUs)")
    if need.kv_cache > 0.25 * have:
        hints.append("kv_cache_tokens")
    if need.workspace > 0.25 * have:
        hints.append("max_batch_tokens (or max_model_len)")
    raise ValueError(
        f"{what} needs {need.describe()} on {device}, but only {gib(have)} is free; use "
        f"{', or '.join(hints) or 'a smaller kv_cache_tokens or max_batch_tokens'}")
