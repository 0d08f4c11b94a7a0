"""Python wrappers of the CUDA kernels in `nanorun._cuda`.

`nanorun._cuda` is only built where nvcc was found, so it is imported lazily: this module
imports cleanly on any machine, and `available()` says whether the kernels can run here.
The wrappers pass raw pointers plus shapes/strides (`_cuda.TensorArg`) and torch's current
stream of the tensors' device; every argument is validated in C++ (ValueError naming the
argument), and a failed launch raises RuntimeError. Kernels only enqueue work on that stream,
so all of them can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
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


def kv_append(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Write each token's key/value into the paged caches, in place.

    Token t goes to slot `slot_mapping[t] = page * page_size + offset`; a negative slot
    (padding) is skipped, and so is one past the cache's end (the kernel never writes outside
    the caches). key/value may be strided views (e.g. slices of a fused QKV output) as long as
    D has unit stride. key, value and both caches share one dtype (any of float32, float16,
    bfloat16, int32, int64).
    """
    _lib().kv_append(
        _arg(key), _arg(value), _arg(k_cache), _arg(v_cache), _arg(slot_mapping), _stream(key)
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
