"""Python wrappers of the CUDA kernels in `nanorun._cuda`.

`nanorun._cuda` is only built where nvcc was found, so it is imported lazily: this module
imports cleanly on any machine, and `available()` says whether the kernels can run here.
The wrappers pass raw pointers plus shapes/strides (`_cuda.TensorArg`) and torch's current
stream of the tensors' device; every argument is validated in C++ (ValueError naming the
argument), and a failed launch raises RuntimeError. Kernels only enqueue work on that stream:
no allocation (unless a wrapper is asked to allocate its output), no host-device copy, no
read of device data on the host, so all of them can be captured in a CUDA graph.

`cta_budget` (kv_append, paged_attention) is the most CTAs a kernel's grid may hold, so it
stays inside an SM partition; None means as many as fit on the device. Those kernels stride
over their work, so any budget >= 1 gives the same result.
"""

from __future__ import annotations

import functools
from numbers import Integral
from types import ModuleType

import torch

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int32: "int32",
    torch.int64: "int64",
}


@functools.lru_cache(maxsize=None)
def _module() -> ModuleType | None:
    try:
        from . import _cuda
    except ImportError:
        return None
    return _cuda


def available() -> bool:
    """True if `nanorun._cuda` was built and torch sees a CUDA device."""
    return _module() is not None and torch.cuda.is_available()


def _lib() -> ModuleType:
    mod = _module()
    if mod is None:
        raise RuntimeError(
            "nanorun._cuda is not built (nvcc was not found at build time, or NANORUN_CUDA=OFF)"
        )
    return mod


def _arg(t: torch.Tensor):  # -> nanorun._cuda.TensorArg
    """A `_cuda.TensorArg` describing `t` (not owning it: `t` must outlive the call)."""
    dtype = _DTYPE_NAMES.get(t.dtype)
    if dtype is None:
        raise ValueError(f"unsupported dtype {t.dtype} (expected one of {list(_DTYPE_NAMES)})")
    device = t.device.index if t.is_cuda else -1
    return _lib().TensorArg(t.data_ptr(), dtype, list(t.shape), list(t.stride()), device)


def _stream(t: torch.Tensor) -> int:
    # The current stream of the tensor's own device (not of the current device), so a launch
    # orders correctly with torch's work on that tensor. CPU tensors fail validation in C++.
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [N, H] without copying (raises if the leading dims cannot be merged)."""
    return t if t.dim() == 2 else t.view(-1, t.shape[-1])


def _optional_count(name: str, value: int | None) -> int:
    """None -> 0 (the kernels' "unset"), else an int >= 1."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    return int(value)


def kv_append(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64
    cta_budget: int | None = None,
) -> None:
    """Write each token's key/value into the paged caches, in place.

    Token t goes to slot `slot_mapping[t] = page * page_size + offset`; a negative slot
    (padding) is skipped, and so is one past the cache's end (the kernel never writes outside
    the caches). key/value may be strided views (e.g. slices of a fused QKV output) as long as
    D has unit stride. key, value and both caches share one dtype (any of float32, float16,
    bfloat16, int32, int64).
    """
    _lib().kv_append(
        _arg(key), _arg(value), _arg(k_cache), _arg(v_cache), _arg(slot_mapping),
        _optional_count("cta_budget", cta_budget), _stream(key),
    )


def rms_norm(
    x: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [H]
    eps: float,
    out: torch.Tensor | None = None,  # [..., H], may be x itself
) -> torch.Tensor:
    """out = x / sqrt(mean(x^2, -1) + eps) * weight, accumulated in fp32; returns out.

    x, weight and out share one dtype (float32, float16 or bfloat16). Leading dims are merged,
    so x and out must be viewable as [N, H] (rows may be strided; H needs unit stride).
    """
    if out is None:
        out = torch.empty_like(x)
    _lib().rms_norm(_arg(_rows(out)), _arg(_rows(x)), _arg(weight), float(eps), _stream(x))
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # [..., H]; in: the sublayer output, out: the normed result
    residual: torch.Tensor,  # [..., H]; in: the residual stream, out: residual + x
    weight: torch.Tensor,  # [H]
    eps: float,
) -> None:
    """In place: `residual += x`, then `x = rms_norm(residual) * weight`.

    Both tensors are overwritten: `residual` holds the updated residual stream (rounded to its
    dtype) and `x` the normalized result, which is exactly what an unfused
    `residual = x + residual; x = rms_norm(residual, weight, eps)` gives. One dtype for all
    three (float32, float16 or bfloat16); fp32 accumulation.
    """
    _lib().fused_add_rms_norm(
        _arg(_rows(x)), _arg(_rows(residual)), _arg(weight), float(eps), _stream(x)
    )


def silu_and_mul(
    x: torch.Tensor,  # [..., 2I]: gate in the first half, up in the second
    out: torch.Tensor | None = None,  # [..., I]
) -> torch.Tensor:
    """out = silu(x[..., :I]) * x[..., I:], computed in fp32; returns out.

    x and out share one dtype (float32, float16 or bfloat16).
    """
    if out is None:
        out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
    _lib().silu_and_mul(_arg(_rows(out)), _arg(_rows(x)), _stream(x))
    return out


def rotary_embedding(
    qk: torch.Tensor,  # [T, H, Dh]: query and key heads, e.g. a view of the fused QKV output
    positions: torch.Tensor,  # [T] int64
    cos: torch.Tensor | None = None,  # [max_position, Dh/2] float32
    sin: torch.Tensor | None = None,  # [max_position, Dh/2] float32
    *,
    inv_freq: torch.Tensor | None = None,  # [Dh/2] float32
) -> None:
    """Rotate every head of qk by its token's position, in place ("rotate half", fp32 math).

    Dims i and i + Dh/2 form a pair: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin. The angles
    come from `cos`/`sin` tables indexed by position (the model's own tables, so Llama 3 or
    linear rope scaling is already in them), or from `inv_freq` (scaling applied), with angle
    = float32(position) * inv_freq[i] computed on the device: no table of max_position rows.
    A position outside the table (or negative) turns its token's heads into NaN. qk is float32,
    float16 or bfloat16, with any token and head strides and unit stride in Dh.
    """
    if (inv_freq is None) == (cos is None or sin is None):
        raise ValueError("rotary_embedding: give cos and sin, or inv_freq (not both)")
    if inv_freq is not None:
        _lib().rotary_embedding_inv_freq(_arg(qk), _arg(positions), _arg(inv_freq), _stream(qk))
    else:
        _lib().rotary_embedding(_arg(qk), _arg(positions), _arg(cos), _arg(sin), _stream(qk))


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D] float16 / bfloat16
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D], contiguous
    v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D], contiguous
    block_tables: torch.Tensor,  # [num_seqs, max_pages] int32
    seq_ids: torch.Tensor,  # [T] int32
    positions: torch.Tensor,  # [T] int64
    scale: float,
    out: torch.Tensor,  # [T, Hq, D], written in place
    sliding_window: int | None = None,
    cta_budget: int | None = None,
    workspace: torch.Tensor | None = None,  # [W] float32 scratch for split-KV
) -> torch.Tensor:
    """Paged-KV attention for decode tokens and prompt chunks in any mix; writes, returns out.

    Semantics of nanorun.ops.paged_attention (token t attends to positions lo..positions[t] of
    sequence seq_ids[t]; sliding window; grouped-query heads). Head dims 32, 64, 128. Decode
    tokens and prefill tiles are told apart on the device (see cuda/src/kernels/
    attention_kernel.cuh), so nothing about the batch is read on the host. Split-KV (for
    batches too small to fill the budget) needs `workspace`; without one (or with a small
    one) fewer or no splits are used: same result, less parallelism. Tokens with out-of-range
    metadata (sequence id, page id, position) get NaN, never an out-of-bounds read.
    """
    ws = workspace if workspace is not None else torch.empty(0, dtype=torch.float32,
                                                             device=q.device)
    _lib().paged_attention(
        _arg(q), _arg(k_cache), _arg(v_cache), _arg(block_tables), _arg(seq_ids),
        _arg(positions), _arg(out), _arg(ws), float(scale),
        _optional_count("sliding_window", sliding_window),
        _optional_count("cta_budget", cta_budget), _stream(q),
    )
    return out


def paged_attention_capacity(q: torch.Tensor) -> int:
    """CTAs of paged_attention that fit on q's device at once (SMs x resident CTAs per SM) for
    q's dtype and head dim: what a cta_budget of None means."""
    if not q.is_cuda:
        raise ValueError(f"paged_attention_capacity needs a CUDA tensor, got one on {q.device}")
    return int(_lib().paged_attention_capacity(_arg(q)))


def paged_attention_plan(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    sliding_window: int | None = None,
    cta_budget: int | None = None,
    workspace: torch.Tensor | None = None,
):  # -> nanorun._cuda.AttentionPlan
    """The work plan paged_attention uses for these arguments: splits, grid, items, ...

    A function of shapes, the budget and the device only (never of tensor contents).
    """
    ws = workspace if workspace is not None else torch.empty(0, dtype=torch.float32,
                                                             device=q.device)
    return _lib().paged_attention_plan(
        _arg(q), _arg(k_cache), _arg(v_cache), _arg(block_tables), _arg(seq_ids),
        _arg(positions), _arg(out), _arg(ws), float(scale),
        _optional_count("sliding_window", sliding_window),
        _optional_count("cta_budget", cta_budget),
    )
