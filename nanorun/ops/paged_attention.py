"""Attention over a paged KV cache, for decode tokens and prefill chunks in one batch.

Layout (one layer):
  k_cache, v_cache  [num_pages, page_size, num_kv_heads, head_dim], contiguous
  block_tables      [num_seqs, max_pages_per_seq] int32, the pages of each sequence in order,
                    padded with -1
  q, out            [T, num_heads, head_dim], one row per query token of the batch
  seq_ids           [T] int32, the row of block_tables that token t belongs to
  positions         [T] int64, the absolute position of token t in its sequence

Token t attends to the cache positions j of its sequence with lo <= j <= positions[t], where
lo = 0, or lo = max(0, positions[t] - W + 1) with a sliding window W: the token sees itself and
the W - 1 tokens before it, exactly Hugging Face's `sliding_window_overlay`
(`kv_idx > q_idx - sliding_window`) on top of the causal mask. Position j lives at page
block_tables[s, j // page_size], offset j % page_size. The K/V of token t itself and of every
earlier position must already be in the cache (see `kv_append`). Query head h reads kv head
h // (num_heads // num_kv_heads) (grouped-query attention). With `logit_softcap` c (Gemma 2) each
score s = scale * q.k becomes c * tanh(s / c) before the softmax, as HF's eager attention does.

Strides: q, out, block_tables, seq_ids and positions may be any strided views (out, e.g., rows
of a wider buffer: it is written in place); k_cache / v_cache must be contiguous, which a layer
slice of KVCache storage is, and are checked.

Four entry points compute the same thing:
  paged_attention_reference  the test oracle: a Python loop over tokens, accumulated in float64
  paged_attention_numba      CPU float32, streaming softmax straight off the pages (decode)
  paged_attention_torch      any device / dtype: gathers pages, one SDPA call per group of runs
  paged_attention            the dispatcher used by the model code
and `kv_append` writes new K/V rows into the cache.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Iterator, NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PREFILL_RUN_THRESHOLD",
    "kv_append",
    "paged_attention",
    "paged_attention_numba",
    "paged_attention_reference",
    "paged_attention_torch",
]

# Runs of at least this many consecutive tokens of one sequence go to the torch (SDPA / BLAS)
# path in the dispatcher; shorter runs (decode tokens, tiny chunks) go to the numba kernel.
# Measured with bench/studies/cpu_attention.py on the 2-core development machine (torch 2.13 CPU,
# numba 0.68; 32 query heads, 8 kv heads, head_dim 128, page_size 16, one sequence). Median ms
# per call as numba / torch, two runs each (the machine was shared, so numbers are noisy):
#   run length        4            8            12           16
#   context 512    1.2 / 1.7    2.1 / 1.9    3.2 / 2.1    4.3 / 2.6
#                  2.2 / 3.1    3.7 / 3.4    5.2 / 3.1    6.1 / 4.2
#   context 2048   5.0 / 6.5   10.2 / 13.1  15.9 / 8.3   21.3 / 9.9
#                  6.0 / 7.4   11.5 / 13.4  22.8 / 11.5  25.6 / 10.3
# Numba grows by ~0.3 ms (512) / ~1.3 ms (2048) per token; torch pays a fixed page-gather and
# mask cost, then grows slowly (and at 8 query rows it is oddly slow at long contexts). So the
# crossover is ~4-8 tokens at context 512 and ~8-12 at 2048: at 12 torch wins in every run at
# both contexts, while at 8 the winner flips with context and noise.
PREFILL_RUN_THRESHOLD = 12

# Inside the torch path, runs of at most this many tokens are padded to a common length and
# share one SDPA call: padding costs at most this factor in query rows, while one call per
# sequence would cost a launch (and on GPU several kernels) for every decode token.
_TORCH_SHORT_RUN = 8

# Bound on the K (and V) elements gathered for one batched SDPA call of short runs, so a big
# decode batch with long contexts does not materialise its whole KV at once (16M elements is
# 64 MiB per tensor in float32).
_TORCH_GATHER_BUDGET = 1 << 24

# enable_gqa arrived in torch 2.5; nanorun supports torch >= 2.4.
_HAS_ENABLE_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)

# "reassoc" lets LLVM vectorise the dot-product and accumulation loops, "contract" allows FMAs.
# Deliberately not "nnan"/"ninf" (the running maximum starts at -inf) nor "afn" (approximate
# exp would cost accuracy against the 1e-5 tolerance).
_FASTMATH = {"reassoc", "contract"}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """The obviously-correct oracle: one token at a time, softmax in float64.

    Returns a new float32 tensor [T, num_heads, head_dim] on the CPU.
    """
    _check_attention_args(q, k_cache, v_cache, block_tables, seq_ids, positions, scale,
                          sliding_window, logit_softcap=logit_softcap)
    q, k_cache, v_cache = (x.detach().cpu().double() for x in (q, k_cache, v_cache))
    block_tables, seq_ids, positions = (x.cpu() for x in (block_tables, seq_ids, positions))
    if q.shape[0]:
        _checked_cpu_runs(k_cache, block_tables, seq_ids, positions, sliding_window)

    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float64)
    for t in range(num_tokens):
        pos = int(positions[t])
        lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
        j = torch.arange(lo, pos + 1)                                      # [n]
        pages = block_tables[int(seq_ids[t])][j // page_size].long()       # [n]
        k = k_cache[pages, j % page_size]                                  # [n, Hkv, D]
        v = v_cache[pages, j % page_size]                                  # [n, Hkv, D]
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)          # [n, H, D]
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)          # [n, H, D]
        scores = scale * torch.einsum("hd,nhd->hn", q[t], k)                # [H, n]
        if logit_softcap is not None:
            scores = logit_softcap * torch.tanh(scores / logit_softcap)
        probs = torch.softmax(scores, dim=-1)                               # [H, n]
        out[t] = torch.einsum("hn,nhd->hd", probs, v)
    return out.float()


def paged_attention_numba(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """CPU float32 kernel: streaming softmax read straight off the pages; writes and returns out.

    Parallel over (token, kv head) pairs, so the query heads of a GQA group share every K/V row
    they load. Memory is O(group * (head_dim + page_size)) per pair: no [T, context] buffer.
    All tensors must be on the CPU and q / caches / out float32. `out` may be any strided view
    (it is written through a contiguous scratch buffer when it is not contiguous).
    """
    _check_attention_args(q, k_cache, v_cache, block_tables, seq_ids, positions, scale,
                          sliding_window, out, logit_softcap)
    _require_cpu_float32(q)
    if q.shape[0]:
        _checked_cpu_runs(k_cache, block_tables, seq_ids, positions, sliding_window)
        _numba_attention(q, k_cache, v_cache, block_tables, seq_ids, positions, scale,
                         sliding_window, out, logit_softcap=logit_softcap)
    return out


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Vectorised path for any device and float dtype; writes and returns out.

    Tokens are grouped into runs of consecutive tokens of one sequence. Each run gathers only the
    pages its tokens read and runs one `scaled_dot_product_attention` with a boolean mask built
    from the positions (causal within the chunk, the earlier context, the sliding window); short
    runs are padded together into a shared call. Computes in the input dtype, except float16 /
    bfloat16 on the CPU, which are upcast to float32.

    On a non-CPU device this copies seq_ids and positions to the host once per call (one sync)
    to find the runs; it is a portable fallback, not the GPU fast path. Page indices are checked
    on the CPU only: out-of-range pages on a GPU are undefined behaviour.
    """
    _check_attention_args(q, k_cache, v_cache, block_tables, seq_ids, positions, scale,
                          sliding_window, out, logit_softcap)
    if q.shape[0]:
        if q.device.type == "cpu":
            runs = _checked_cpu_runs(k_cache, block_tables, seq_ids, positions, sliding_window)
        else:
            runs = _find_runs(*_host_index_arrays(seq_ids, positions), k_cache.shape[1],
                              sliding_window)
        _torch_attention(q, k_cache, v_cache, block_tables, positions, runs, scale,
                         sliding_window, out, logit_softcap)
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Attention for a mixed decode / chunked-prefill batch; writes and returns out [T, H, D].

    CPU float32: runs of >= PREFILL_RUN_THRESHOLD tokens of one sequence (prefill chunks) take
    the torch path, where SDPA's matrix-matrix products win; all other tokens (decode) take the
    numba kernel. Anything else (GPU tensors, float16 / bfloat16 / float64) takes the torch path.
    The dispatcher itself adds no host-device sync: for non-CPU tensors it goes straight to
    `paged_attention_torch` (see its note on the one sync it makes).
    """
    _check_attention_args(q, k_cache, v_cache, block_tables, seq_ids, positions, scale,
                          sliding_window, out, logit_softcap)
    if not q.shape[0]:
        return out
    if q.device.type != "cpu" or q.dtype != torch.float32:
        return paged_attention_torch(q, k_cache, v_cache, block_tables, seq_ids, positions,
                                     scale, out, sliding_window, logit_softcap)

    runs = _checked_cpu_runs(k_cache, block_tables, seq_ids, positions, sliding_window)
    is_long = runs.length >= PREFILL_RUN_THRESHOLD                          # [R]
    if is_long.any():
        _torch_attention(q, k_cache, v_cache, block_tables, positions, runs.select(is_long),
                         scale, sliding_window, out, logit_softcap)
    if not is_long.all():
        short_tokens = None if not is_long.any() else np.flatnonzero(
            np.repeat(~is_long, runs.length))                               # [T_short]
        _numba_attention(q, k_cache, v_cache, block_tables, seq_ids, positions, scale,
                         sliding_window, out, short_tokens, logit_softcap)
    return out


def kv_append(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key / value [T, num_kv_heads, head_dim] into the cache at slot_mapping [T] int64.

    slot = page * page_size + offset. Tokens with a negative slot (padding) are skipped. Slots of
    the valid tokens must be distinct. Works on any device; on non-CPU devices it never syncs.
    """
    _check_kv_append_args(key, value, k_cache, v_cache, slot_mapping)
    k_flat = k_cache.view(-1, *k_cache.shape[2:])                           # [P*page, Hkv, D]
    v_flat = v_cache.view(-1, *v_cache.shape[2:])                           # [P*page, Hkv, D]
    if key.device.type == "cpu":
        _kv_write_masked(key, value, k_flat, v_flat, slot_mapping)
    else:
        _kv_write_sync_free(key, value, k_flat, v_flat, slot_mapping)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _expect_tensor(name: str, x: object, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {shape_doc}, "
                         f"got shape {tuple(x.shape)}")
    return x


def _expect_dtype(name: str, x: torch.Tensor, dtype: torch.dtype) -> None:
    if x.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {x.dtype}")


def _expect_same_device(named: dict[str, torch.Tensor]) -> None:
    devices = {name: x.device for name, x in named.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name}: expected device {first} (the device of {first_name}), "
                             f"got {device}")


def _check_attention_args(q, k_cache, v_cache, block_tables, seq_ids, positions, scale,
                          sliding_window, out=None, logit_softcap=None) -> None:
    """Shapes, dtypes and devices only: O(1), no reads of tensor data."""
    _expect_tensor("q", q, 3, "[T, num_heads, head_dim]")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q: expected a floating-point dtype, got {q.dtype}")
    _check_cache_pair(k_cache, v_cache, q.dtype)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache: expected head_dim {head_dim} (q.shape[2]) in dim 3, "
                         f"got shape {tuple(k_cache.shape)}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"q: expected num_heads ({num_heads}) to be a multiple of "
                         f"num_kv_heads ({num_kv_heads}, k_cache.shape[2])")
    _expect_tensor("block_tables", block_tables, 2, "[num_seqs, max_pages_per_seq]")
    _expect_dtype("block_tables", block_tables, torch.int32)
    for name, x, dtype in (("seq_ids", seq_ids, torch.int32),
                           ("positions", positions, torch.int64)):
        _expect_tensor(name, x, 1, "[T]")
        _expect_dtype(name, x, dtype)
        if x.shape[0] != num_tokens:
            raise ValueError(f"{name}: expected length T={num_tokens} (q.shape[0]), "
                             f"got {x.shape[0]}")
    tensors = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                   seq_ids=seq_ids, positions=positions)
    if out is not None:
        _expect_tensor("out", out, 3, "[T, num_heads, head_dim]")
        if out.shape != q.shape:
            raise ValueError(f"out: expected shape {tuple(q.shape)} (that of q), "
                             f"got {tuple(out.shape)}")
        _expect_dtype("out", out, q.dtype)
        tensors["out"] = out
    _expect_same_device(tensors)
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise ValueError(f"scale: expected a real number, got {type(scale).__name__}")
    if sliding_window is not None and (isinstance(sliding_window, bool)
                                       or not isinstance(sliding_window, Integral)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window: expected None or an int >= 1, got {sliding_window!r}")
    if logit_softcap is not None and (isinstance(logit_softcap, bool)
                                      or not isinstance(logit_softcap, Real)
                                      or not logit_softcap > 0):
        raise ValueError(f"logit_softcap: expected None or a number > 0, got {logit_softcap!r}")


def _check_cache_pair(k_cache, v_cache, dtype: torch.dtype) -> None:
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _expect_tensor(name, cache, 4, "[num_pages, page_size, num_kv_heads, head_dim]")
        _expect_dtype(name, cache, dtype)
        # The kernels read and kv_append writes through flat views of the storage; a layer slice
        # of the KV cache's [num_layers, ...] storage is contiguous.
        if not cache.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected shape {tuple(k_cache.shape)} (that of k_cache), "
                         f"got {tuple(v_cache.shape)}")


def _checked_cpu_runs(k_cache, block_tables, seq_ids, positions, sliding_window) -> "_Runs":
    """The runs of a non-empty CPU batch, after checking every page it reads exists."""
    runs = _find_runs(seq_ids.numpy(), positions.numpy(), k_cache.shape[1], sliding_window)
    _check_cache_reads(block_tables, seq_ids, positions, runs, k_cache.shape[0])
    return runs


def _check_cache_reads(block_tables, seq_ids, positions, runs: "_Runs", num_pages: int) -> None:
    """Every page any token reads exists (CPU tensors only; vectorised, O(T + R * pages)).

    The numba kernel does no bounds checks, and torch indexing would silently wrap a -1 page to
    the last one, so a padding or stale entry here would read the wrong memory.
    """
    num_seqs, max_pages = block_tables.shape
    seq, pos = seq_ids.numpy(), positions.numpy()
    if seq.min() < 0 or seq.max() >= num_seqs:
        raise ValueError(f"seq_ids: expected values in [0, {num_seqs}) (rows of block_tables), "
                         f"got range [{seq.min()}, {seq.max()}]")
    if pos.min() < 0:
        raise ValueError(f"positions: expected non-negative positions, got {pos.min()}")
    if runs.page_hi.max() > max_pages:
        raise ValueError(f"positions: position {pos.max()} needs page column "
                         f"{runs.page_hi.max() - 1}, but block_tables has {max_pages} columns")
    cols = np.arange(max_pages)                                             # [P]
    needed = (cols >= runs.page_lo[:, None]) & (cols < runs.page_hi[:, None])  # [R, P]
    pages = block_tables.numpy()[runs.seq][needed]
    if pages.min() < 0 or pages.max() >= num_pages:
        raise ValueError(f"block_tables: expected page ids in [0, {num_pages}) for every page a "
                         f"token reads, got range [{pages.min()}, {pages.max()}]")


def _require_cpu_float32(q: torch.Tensor) -> None:
    # _check_attention_args already made the other tensors match q's device and dtype.
    if q.device.type != "cpu" or q.dtype != torch.float32:
        raise ValueError(f"q: paged_attention_numba expects float32 CPU tensors, "
                         f"got {q.dtype} on {q.device}")


def _check_kv_append_args(key, value, k_cache, v_cache, slot_mapping) -> None:
    _expect_tensor("key", key, 3, "[T, num_kv_heads, head_dim]")
    _check_cache_pair(k_cache, v_cache, key.dtype)
    _expect_tensor("value", value, 3, "[T, num_kv_heads, head_dim]")
    _expect_dtype("value", value, key.dtype)
    for name, x in (("key", key), ("value", value)):
        if x.shape[1:] != k_cache.shape[2:]:
            raise ValueError(f"{name}: expected [T, {k_cache.shape[2]}, {k_cache.shape[3]}] "
                             f"(num_kv_heads, head_dim of k_cache), got {tuple(x.shape)}")
    if value.shape[0] != key.shape[0]:
        raise ValueError(f"value: expected T={key.shape[0]} rows (as key), got {value.shape[0]}")
    _expect_tensor("slot_mapping", slot_mapping, 1, "[T]")
    _expect_dtype("slot_mapping", slot_mapping, torch.int64)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping: expected length T={key.shape[0]}, "
                         f"got {slot_mapping.shape[0]}")
    _expect_same_device(dict(key=key, value=value, k_cache=k_cache, v_cache=v_cache,
                             slot_mapping=slot_mapping))


# --------------------------------------------------------------------------------------------
# Runs: maximal stretches of consecutive tokens of one sequence
# --------------------------------------------------------------------------------------------


class _Runs(NamedTuple):
    """Host (numpy) description of R runs; every field is [R] int64."""

    start: np.ndarray    # first token of the run
    length: np.ndarray   # number of tokens
    seq: np.ndarray      # row of block_tables
    page_lo: np.ndarray  # first column of that row any token of the run reads
    page_hi: np.ndarray  # one past the last column read

    def select(self, which) -> "_Runs":
        return _Runs(*(field[which] for field in self))


def _host_index_arrays(seq_ids: torch.Tensor, positions: torch.Tensor):
    """seq_ids, positions as numpy arrays (zero-copy on the CPU, one sync elsewhere)."""
    if seq_ids.device.type == "cpu":
        return seq_ids.numpy(), positions.numpy()
    both = torch.stack((seq_ids.to(torch.int64), positions)).cpu().numpy()  # [2, T]
    return both[0], both[1]


def _find_runs(seq: np.ndarray, pos: np.ndarray, page_size: int,
               sliding_window: int | None) -> _Runs:
    """Vectorised run-length grouping of a non-empty batch."""
    breaks = np.flatnonzero(seq[1:] != seq[:-1]) + 1
    start = np.concatenate(([0], breaks)).astype(np.int64)
    length = np.diff(np.append(start, len(seq)))
    first_pos = np.minimum.reduceat(pos, start)
    last_pos = np.maximum.reduceat(pos, start)
    lo = np.zeros_like(first_pos) if sliding_window is None else np.maximum(
        first_pos - sliding_window + 1, 0)
    return _Runs(start, length, seq[start].astype(np.int64), lo // page_size,
                 last_pos // page_size + 1)


# --------------------------------------------------------------------------------------------
# Numba path
# --------------------------------------------------------------------------------------------


def _numba_attention(q, k_cache, v_cache, block_tables, seq_ids, positions, scale,
                     sliding_window, out, tokens: np.ndarray | None = None,
                     logit_softcap: float | None = None) -> None:
    """Run the kernel on all tokens, or on `tokens` [T'] (indices into the batch) only."""
    index = slice(None) if tokens is None else torch.from_numpy(tokens)
    q, seq_ids, positions = q[index], seq_ids[index], positions[index]
    # The kernel is compiled for C-contiguous arrays only (one signature, one compile), so a
    # subset of tokens or a strided `out` goes through a scratch buffer.
    direct = tokens is None and out.is_contiguous()
    result = out if direct else torch.empty(q.shape, dtype=torch.float32)  # [T', H, D]
    _paged_attention_kernel(
        _c_array(q), k_cache.detach().numpy(), v_cache.detach().numpy(), _c_array(block_tables),
        _c_array(seq_ids), _c_array(positions), np.float32(scale),
        np.int64(sliding_window or 0), np.float32(logit_softcap or 0.0),
        result.detach().numpy())
    if not direct:
        out[index] = result


def _c_array(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().numpy())


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _paged_attention_kernel(q, k_cache, v_cache, block_tables, seq_ids, positions, scale,
                            window, softcap, out):
    """q, out [T, H, D] f32; caches [P, page, Hkv, D] f32; window 0 = no sliding window;
    softcap 0 = no logit soft-capping."""
    num_tokens, num_heads = q.shape[0], q.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    for item in numba.prange(num_tokens * num_kv_heads):
        t, kv_head = item // num_kv_heads, item % num_kv_heads
        h0, h1 = kv_head * group, (kv_head + 1) * group
        _attend_group(q[t, h0:h1], k_cache, v_cache, block_tables[seq_ids[t]], positions[t],
                      kv_head, scale, window, softcap, out[t, h0:h1])


@numba.njit(cache=True, fastmath=_FASTMATH)
def _attend_group(q, k_cache, v_cache, page_row, pos, kv_head, scale, window, softcap, out):
    """One token, the query heads q [G, D] of one kv head; writes out [G, D].

    Online softmax, one page-aligned block of positions at a time: per block, compute the G x n
    scores, raise the running max once and rescale the accumulators once (flash-attention
    style), then add the block's weighted V rows.
    """
    group, head_dim = q.shape
    page_size = k_cache.shape[1]
    q = q * scale                                             # [G, D] f32, scaled once
    run_max = np.full(group, -np.inf, dtype=np.float32)       # [G]
    denom = np.zeros(group, dtype=np.float32)                 # [G]
    acc = np.zeros((group, head_dim), dtype=np.float32)       # [G, D]
    scores = np.empty((group, page_size), dtype=np.float32)   # [G, page]
    j = 0 if window <= 0 else max(0, pos - window + 1)
    while j <= pos:
        page, offset = page_row[j // page_size], j % page_size
        n = min(page_size - offset, pos + 1 - j)              # positions in this block
        for g in range(group):
            block_max = run_max[g]
            for i in range(n):
                dot = np.float32(0.0)
                for d in range(head_dim):
                    dot += q[g, d] * k_cache[page, offset + i, kv_head, d]
                if softcap > 0:        # Gemma 2: cap * tanh(score / cap), before the softmax
                    dot = softcap * np.tanh(dot / softcap)
                scores[g, i] = dot
                block_max = max(block_max, dot)
            rescale = np.exp(run_max[g] - block_max)          # 0 on the first block
            denom[g] *= rescale
            for d in range(head_dim):
                acc[g, d] *= rescale
            for i in range(n):
                p = np.exp(scores[g, i] - block_max)
                denom[g] += p
                for d in range(head_dim):
                    acc[g, d] += p * v_cache[page, offset + i, kv_head, d]
            run_max[g] = block_max
        j += n
    for g in range(group):
        for d in range(head_dim):
            out[g, d] = acc[g, d] / denom[g]


# --------------------------------------------------------------------------------------------
# Torch path
# --------------------------------------------------------------------------------------------


def _torch_attention(q, k_cache, v_cache, block_tables, positions, runs: _Runs, scale,
                     sliding_window, out, logit_softcap=None) -> None:
    for batch in _run_batches(runs, k_cache.shape[1] * k_cache.shape[2] * k_cache.shape[3]):
        _attend_runs(q, k_cache, v_cache, block_tables, positions, runs.select(batch), scale,
                     sliding_window, out, logit_softcap)


def _run_batches(runs: _Runs, elems_per_page: int) -> Iterator[np.ndarray]:
    """Indices of runs that share one SDPA call: each long run alone, short runs padded together
    within the gather budget. A Python loop per run (per sequence), never per token."""
    is_long = runs.length > _TORCH_SHORT_RUN
    for i in np.flatnonzero(is_long):
        yield np.array([i])
    batch, widest = [], 0
    for i in np.flatnonzero(~is_long):
        pages = int(runs.page_hi[i] - runs.page_lo[i])
        padded_elems = (len(batch) + 1) * max(widest, pages) * elems_per_page
        if batch and padded_elems > _TORCH_GATHER_BUDGET:
            yield np.array(batch)
            batch, widest = [], 0
        batch.append(i)
        widest = max(widest, pages)
    if batch:
        yield np.array(batch)


def _attend_runs(q, k_cache, v_cache, block_tables, positions, runs: _Runs, scale,
                 sliding_window, out, logit_softcap=None) -> None:
    """One SDPA call over R runs padded to a common query length and page count."""
    device, page_size = q.device, k_cache.shape[1]
    q_len = int(runs.length.max())
    num_pages = runs.page_hi - runs.page_lo                                 # [R]
    # Padding rows / pages repeat the run's last token / needed page, so they stay finite and in
    # bounds; padding rows are dropped on output, padding pages sit past every query position
    # (kpos below is not clamped) and are masked out.
    q_rows = runs.start[:, None] + np.minimum(np.arange(q_len), runs.length[:, None] - 1)
    page_cols = runs.page_lo[:, None] + np.minimum(np.arange(num_pages.max()),
                                                   num_pages[:, None] - 1)
    kpos = runs.page_lo[:, None] * page_size + np.arange(num_pages.max() * page_size)
    q_rows, page_cols, kpos, seq = (torch.from_numpy(a).to(device)
                                    for a in (q_rows, page_cols, kpos, runs.seq))

    pages = block_tables[seq[:, None], page_cols].long()                   # [R, Np]
    dtype = _compute_dtype(q)
    keys = k_cache[pages].flatten(1, 2).to(dtype).transpose(1, 2)           # [R, Hkv, K, D]
    values = v_cache[pages].flatten(1, 2).to(dtype).transpose(1, 2)         # [R, Hkv, K, D]
    queries = q[q_rows].to(dtype).transpose(1, 2)                           # [R, H, Lq, D]
    qpos = positions[q_rows][:, :, None]                                    # [R, Lq, 1]
    mask = kpos[:, None, :] <= qpos                                         # [R, Lq, K]
    if sliding_window is not None:
        mask &= kpos[:, None, :] >= qpos - sliding_window + 1
    result = _sdpa(queries, keys, values, mask[:, None], float(scale),
                   logit_softcap)                                           # [R, H, Lq, D]

    src, dst = _unpad_indices(runs, q_len)
    result = result.transpose(1, 2).flatten(0, 1)                          # [R*Lq, H, D]
    out[torch.from_numpy(dst).to(device)] = result[torch.from_numpy(src).to(device)].to(out.dtype)


def _unpad_indices(runs: _Runs, q_len: int):
    """For each real token: its row in the padded [R*Lq] result and its row in out."""
    offset = np.arange(runs.length.sum()) - np.repeat(np.cumsum(runs.length) - runs.length,
                                                      runs.length)
    src = np.repeat(np.arange(len(runs.start)) * q_len, runs.length) + offset
    dst = np.repeat(runs.start, runs.length) + offset
    return src, dst


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    # CPU half-precision SDPA is slow or missing on older torch, and float32 is more accurate.
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return q.dtype


def _sdpa(q, k, v, mask, scale: float, logit_softcap: float | None = None) -> torch.Tensor:
    """q [B, H, L, D], k / v [B, Hkv, K, D], mask [B, 1, L, K] bool (True = attend)."""
    if logit_softcap is not None:
        return _softcapped_attention(q, k, v, mask, scale, logit_softcap)
    if _HAS_ENABLE_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _softcapped_attention(q, k, v, mask, scale: float, cap: float) -> torch.Tensor:
    """Attention with Gemma 2's logit soft-capping, cap * tanh(scores / cap) before the
    softmax, which SDPA cannot express: the scores are materialised (as HF's eager path does)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale                  # [B, H, L, K]
    scores = cap * torch.tanh(scores / cap)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # as HF's eager
    return torch.matmul(probs, v)                                           # [B, H, L, D]


# --------------------------------------------------------------------------------------------
# KV append
# --------------------------------------------------------------------------------------------


def _kv_write_masked(key, value, k_flat, v_flat, slot_mapping) -> None:
    """Drop padding tokens with a boolean mask (data-dependent shape: fine on the CPU)."""
    valid = slot_mapping >= 0                                               # [T]
    slots = slot_mapping[valid]
    if slots.numel() and int(slots.max()) >= k_flat.shape[0]:
        raise ValueError(f"slot_mapping: expected slots < num_pages * page_size = "
                         f"{k_flat.shape[0]}, got {int(slots.max())}")
    k_flat[slots] = key[valid]
    v_flat[slots] = value[valid]


def _kv_write_sync_free(key, value, k_flat, v_flat, slot_mapping) -> None:
    """Same result without a data-dependent shape or a scalar read (so no device sync).

    Padding tokens are redirected to the slot of the first valid token and carry that token's
    K/V: duplicate writes of identical data are harmless. With no valid token at all they
    rewrite slot 0 with its own current contents.
    """
    valid = slot_mapping >= 0                                               # [T]
    first = torch.argmax(valid.to(torch.int32)).view(1)                     # [1], 0 if none
    any_valid = valid.any()                                                 # 0-d, stays on device
    fallback_slot = torch.where(any_valid, slot_mapping.index_select(0, first), 0)  # [1]
    slots = torch.where(valid, slot_mapping, fallback_slot)                 # [T]
    for src, flat in ((key, k_flat), (value, v_flat)):
        filler = torch.where(any_valid, src.index_select(0, first), flat[:1])  # [1, Hkv, D]
        flat[slots] = torch.where(valid[:, None, None], src, filler)
