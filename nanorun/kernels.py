"""Which kernels the model's ops call on each device: attention and KV append
(`select_kernels`), and the element-wise ops RMSNorm, rope and SiLU-and-mul (`select_pointwise`).

`select_kernels(device)` returns `(attention_fn, kv_append_fn)` with the signatures of
`nanorun.ops.paged_attention` and `nanorun.ops.kv_append`, plus an optional keyword
`cta_budget: int | None` (the most CTAs the kernel's grid may hold, so it fits its SM partition;
ignored on the CPU). None means: the budget of the SM partition whose launch is being enqueued
(`nanorun.backends.current_sm_budget()`, set by the CUDA backend), else the whole device.

CPU, or CUDA without `nanorun._cuda`: the `nanorun.ops` functions (numba decode attention and
torch for prompt runs). On CUDA they sync with the host once per call, so they cannot be
captured in a CUDA graph: their `graph_safe` is False.

CUDA with `nanorun._cuda` built: `CudaPagedAttention` and `CudaKVAppend` (`graph_safe = True`).
What makes them capturable in a CUDA graph and replayable with new batches:
  * Every per-batch fact is read on the device: page tables, positions, sequence ids. The split
    plan (how many KV splits per decode token, the grid) is a function of tensor shapes, the CTA
    budget and the device only, so a replay with new contents of the same buffers is valid.
  * Mixed batches need no host inspection: one kernel launch tells decode tokens (alone in their
    run of consecutive positions) from prompt-chunk tokens (runs of 2+) on the device and gives
    each its own work item: decode tokens get split-KV, runs get prefill tiles of up to 64 query
    rows (tokens x grouped heads) that share every K/V load. A split batch adds one small merge
    launch. See cuda/src/kernels/attention_kernel.cuh.
  * No allocation per call: split-KV scratch (partial outputs and log-sum-exps) lives in one
    fixed-size workspace per CUDA stream, allocated on the first call on that stream and kept
    for the callable's lifetime (never freed, so a graph that captured it stays valid). Calls on
    different streams may run concurrently; calls on one stream are ordered by it. The split
    plan never uses more of the workspace than it has (fewer splits instead), so its size never
    changes a result. Warm each stream up before capture, as torch recommends; a first call
    during capture also works (the workspace then comes from the graph's memory pool and is
    never released).
  * The kernels support float16 / bfloat16 with head dims 32, 64 and 128 (`supports()`), without
    logit soft-capping. Other inputs (a float32 model on a GPU, Gemma's head dim 256, Gemma 2's
    soft-capped scores) take the `nanorun.ops` path, which syncs: it raises ValueError if called
    while the stream is being captured.
"""

from __future__ import annotations

import torch

from . import cuda_ops
from . import ops
from .backends.cuda import current_sm_budget
from .models.llama import TORCH_POINTWISE, PointwiseOps

# Per-stream split-KV scratch: 2M floats (8 MiB) hold the partial results of every split plan a
# 132-SM device makes for groups of up to 16 query heads per kv head; larger groups split less.
WORKSPACE_FLOATS = 1 << 21

_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (32, 64, 128)


def _cpu_attention(q, k_cache, v_cache, block_tables, seq_ids, positions, scale, out,
                   sliding_window=None, logit_softcap=None, *,
                   cta_budget: int | None = None) -> torch.Tensor:
    """nanorun.ops.paged_attention; cta_budget has no meaning on the CPU."""
    return ops.paged_attention(q, k_cache, v_cache, block_tables, seq_ids, positions, scale, out,
                               sliding_window, logit_softcap)


def _cpu_kv_append(key, value, k_cache, v_cache, slot_mapping, *,
                   cta_budget: int | None = None) -> None:
    """nanorun.ops.kv_append; cta_budget has no meaning on the CPU."""
    ops.kv_append(key, value, k_cache, v_cache, slot_mapping)


_cpu_attention.graph_safe = False
_cpu_kv_append.graph_safe = False


class CudaPagedAttention:
    """`nanorun.ops.paged_attention`'s signature on the CUDA kernels of nanorun._cuda."""

    graph_safe = True

    def __init__(self, device: torch.device, workspace_floats: int = WORKSPACE_FLOATS) -> None:
        self.device = torch.device(device)
        self.workspace_floats = workspace_floats
        self._workspaces: dict[int, torch.Tensor] = {}  # cuda stream handle -> scratch
        self._ctas_per_sm: dict[tuple[torch.dtype, int], int] = {}

    @staticmethod
    def supports(dtype: torch.dtype, head_dim: int) -> bool:
        """Whether inputs of this dtype and head dim run on the CUDA kernel (else nanorun.ops)."""
        return dtype in _CUDA_DTYPES and head_dim in _CUDA_HEAD_DIMS

    def __call__(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
        block_tables: torch.Tensor,  # [num_seqs, max_pages] int32
        seq_ids: torch.Tensor,  # [T] int32
        positions: torch.Tensor,  # [T] int64
        scale: float,
        out: torch.Tensor,  # [T, Hq, D]
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        *,
        cta_budget: int | None = None,
    ) -> torch.Tensor:
        # The CUDA kernel has no logit soft-capping (Gemma 2): those calls take nanorun.ops.
        if not self.supports(q.dtype, q.shape[-1]) or logit_softcap is not None:
            if torch.cuda.is_current_stream_capturing():
                raise ValueError(
                    f"CUDA paged attention supports {_CUDA_DTYPES} with head dims "
                    f"{_CUDA_HEAD_DIMS} and no logit soft-capping, got {q.dtype} with head dim "
                    f"{q.shape[-1]}, logit_softcap={logit_softcap}; the nanorun.ops fallback "
                    "syncs with the host and cannot be graph-captured")
            return ops.paged_attention(q, k_cache, v_cache, block_tables, seq_ids, positions,
                                       scale, out, sliding_window, logit_softcap)
        if cta_budget is None:
            cta_budget = self.partition_budget(q)
        return cuda_ops.paged_attention(
            q, k_cache, v_cache, block_tables, seq_ids, positions, scale, out, sliding_window,
            cta_budget, self.workspace(q.device))

    def partition_budget(self, q: torch.Tensor) -> int | None:
        """CTAs that fit on the SMs of the partition being enqueued (None: no partition, so the
        whole device). A grid sized for the whole device on a green context of a third of its
        SMs would run in three waves, the last mostly idle."""
        sms = current_sm_budget()
        if sms is None:
            return None
        key = (q.dtype, q.shape[-1])
        per_sm = self._ctas_per_sm.get(key)
        if per_sm is None:
            device_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            per_sm = max(1, cuda_ops.paged_attention_capacity(q) // device_sms)
            self._ctas_per_sm[key] = per_sm
        return sms * per_sm

    def workspace(self, device: torch.device) -> torch.Tensor:
        """The split-KV scratch of the current stream of `device` (allocated on first use)."""
        stream = torch.cuda.current_stream(device).cuda_stream
        ws = self._workspaces.get(stream)
        if ws is None:
            ws = torch.empty(self.workspace_floats, dtype=torch.float32, device=device)
            self._workspaces[stream] = ws
        return ws


class CudaKVAppend:
    """`nanorun.ops.kv_append`'s signature on the CUDA kernel (any dtype; never syncs)."""

    graph_safe = True

    def __call__(
        self,
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
        slot_mapping: torch.Tensor,  # [T] int64
        *,
        cta_budget: int | None = None,
    ) -> None:
        cuda_ops.kv_append(key, value, k_cache, v_cache, slot_mapping, cta_budget)


def select_pointwise(device: torch.device) -> PointwiseOps:
    """The model's element-wise ops on `device`: nanorun._cuda's kernels on a GPU where it is
    built (one launch each, fp32 math, no host sync, so graph-safe), else torch's.

    RMSNorm differs from Hugging Face's in rounding only: HF rounds the normalised row to the
    dtype and then multiplies by the weight in the dtype; the kernel multiplies in fp32 and
    rounds once (one bf16 ulp at most, the GPU parity test's tolerance covers it)."""
    if torch.device(device).type == "cuda" and cuda_ops.available():
        return CUDA_POINTWISE
    return TORCH_POINTWISE


def _cuda_rms_norm(x, weight, eps, out) -> None:
    cuda_ops.rms_norm(x, weight, eps, out=out)


def _cuda_rope(qk, positions, cos, sin) -> None:
    cuda_ops.rotary_embedding(qk, positions, cos, sin)


def _cuda_silu_and_mul(gate_up, out) -> None:
    cuda_ops.silu_and_mul(gate_up, out=out)


CUDA_POINTWISE = PointwiseOps(_cuda_rms_norm, _cuda_rope, _cuda_silu_and_mul)


def select_kernels(device: torch.device):
    """(attention_fn, kv_append_fn) for `device`: the CUDA kernels where they can run, else
    nanorun.ops (see the module docstring for the contract of each)."""
    if torch.device(device).type == "cuda" and cuda_ops.available():
        return CudaPagedAttention(device), CudaKVAppend()
    return _cpu_attention, _cpu_kv_append
