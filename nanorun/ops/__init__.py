"""Compute kernels: attention over the paged KV cache and KV writes."""

from .paged_attention import (
    PREFILL_RUN_THRESHOLD,
    kv_append,
    paged_attention,
    paged_attention_numba,
    paged_attention_reference,
    paged_attention_torch,
)

__all__ = [
    "PREFILL_RUN_THRESHOLD",
    "kv_append",
    "paged_attention",
    "paged_attention_numba",
    "paged_attention_reference",
    "paged_attention_torch",
]
