"""Which attention and KV-append kernels the model's ops call on each device."""

from __future__ import annotations

import torch

from .ops import kv_append, paged_attention


def select_kernels(device: torch.device):
    """(attention_fn, kv_append_fn) for `device`.

    CPU: numba decode attention reading pages directly, torch for long prefill runs (the
    dispatcher in nanorun.ops picks per run of tokens). GPU: the same torch path until the CUDA
    kernels of nanorun._cuda take over.
    """
    return paged_attention, kv_append
