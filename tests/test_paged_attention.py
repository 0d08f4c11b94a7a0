"""Paged attention and kv_append against the reference, which is itself checked against dense
attention over unpaged K/V."""

from __future__ import annotations

import importlib
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanorun.ops import (
    PREFILL_RUN_THRESHOLD,
    kv_append,
    paged_attention,
    paged_attention_numba,
    paged_attention_reference,
    paged_attention_torch,
)

# The package re-exports the function `paged_attention`, which shadows the submodule attribute.
pa_module = importlib.import_module("nanorun.ops.paged_attention")

NAN = float("nan")


# --------------------------------------------------------------------------------------------
# Building batches
# --------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    q: torch.Tensor             # [T, H, D]
    k_cache: torch.Tensor       # [P, page, Hkv, D]
    v_cache: torch.Tensor       # [P, page, Hkv, D]
    block_tables: torch.Tensor  # [S, max_pages] int32, -1 padded
    seq_ids: torch.Tensor       # [T] int32
    positions: torch.Tensor     # [T] int64
    scale: float
    keys: list                  # per sequence, unpaged [L, Hkv, D]
    values: list                # per sequence, unpaged [L, Hkv, D]

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_ids,
                self.positions, self.scale)


def make_batch(segments, *, page_size, group, head_dim, num_kv_heads=2, seed=0,
               dtype=torch.float32, shuffle_tokens=False) -> Batch:
    """segments: one (cached, new) pair per sequence; the batch queries positions
    cached .. cached + new - 1, whose K/V (and all earlier ones) are in the cache.

    Pages are assigned in a random order, the cache is filled with noise first (so reading a
    wrong page, offset or position shows up), and every block table has -1 padding.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = [cached + new for cached, new in segments]
    pages = [-(-length // page_size) for length in lengths]
    num_pages = sum(pages) + 3
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    page_ids = torch.randperm(num_pages, generator=gen)
    block_tables = torch.full((len(segments), max(pages) + 1), -1, dtype=torch.int32)
    keys, values, seq_ids, positions, used = [], [], [], [], 0
    for s, ((cached, new), length, n) in enumerate(zip(segments, lengths, pages)):
        ids = page_ids[used:used + n]
        used += n
        block_tables[s, :n] = ids.int()
        k, v = (torch.randn(length, num_kv_heads, head_dim, generator=gen) for _ in range(2))
        # Placed by reshaping the sequence into pages: independent of the j // page_size,
        # j % page_size indexing that the kernels use.
        for cache, x in ((k_cache, k), (v_cache, v)):
            padded = torch.cat([x, cache[ids[-1], length - (n - 1) * page_size:]])
            cache[ids] = padded.view(n, page_size, num_kv_heads, head_dim)
        keys.append(k)
        values.append(v)
        seq_ids += [s] * new
        positions += range(cached, cached + new)
    seq_ids = torch.tensor(seq_ids, dtype=torch.int32)
    positions = torch.tensor(positions, dtype=torch.int64)
    if shuffle_tokens:
        order = torch.randperm(len(seq_ids), generator=gen)
        seq_ids, positions = seq_ids[order], positions[order]
    q = torch.randn(len(seq_ids), num_kv_heads * group, head_dim, generator=gen)
    return Batch(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), block_tables, seq_ids,
                 positions, 1 / math.sqrt(head_dim), keys, values)


MIXED = [(50, 1), (0, 23), (37, 20), (5, 1), (16, 16), (3, 40), (11, 3)]

CASES = {
    "decode-b1": dict(segments=[(300, 1)], page_size=16, group=1, head_dim=64),
    "decode-b7": dict(segments=[(0, 1), (1, 1), (4, 1), (15, 1), (16, 1), (33, 1), (71, 1)],
                      page_size=5, group=4, head_dim=32),
    "decode-b33": dict(segments=[(i * 37 % 101, 1) for i in range(33)], page_size=16, group=8,
                       head_dim=64),
    "mixed": dict(segments=MIXED, page_size=5, group=4, head_dim=64),
    "mixed-shuffled": dict(segments=MIXED, page_size=16, group=1, head_dim=32,
                           shuffle_tokens=True),
    "mixed-window12": dict(segments=MIXED, page_size=16, group=8, head_dim=32, window=12),
    "decode-b7-window8": dict(segments=[(0, 1), (3, 1), (7, 1), (8, 1), (9, 1), (40, 1), (77, 1)],
                              page_size=5, group=1, head_dim=64, window=8),
    "prefill-window3": dict(segments=[(0, 45), (30, 20)], page_size=5, group=4, head_dim=32,
                            window=3),
    "window1": dict(segments=[(9, 1), (0, 14)], page_size=5, group=8, head_dim=32, window=1),
}


IMPLS = {"numba": paged_attention_numba, "torch": paged_attention_torch,
         "dispatch": paged_attention}


def reference(batch: Batch, window=None) -> torch.Tensor:
    return paged_attention_reference(*batch.args(), sliding_window=window)


def run_impl(name, batch: Batch, window=None, out=None) -> torch.Tensor:
    out = torch.full_like(batch.q, NAN) if out is None else out
    result = IMPLS[name](*batch.args(), out, sliding_window=window)
    assert result is out
    return out


def dense_attention(q, k, v, q_positions, scale, window) -> torch.Tensor:
    """float64 attention of q [n, H, D] over unpaged k, v [L, Hkv, D], mask by explicit loops."""
    length, num_kv_heads = k.shape[0], k.shape[1]
    group = q.shape[1] // num_kv_heads
    mask = torch.zeros(len(q_positions), length, dtype=torch.bool)
    for i, q_idx in enumerate(q_positions.tolist()):
        for kv_idx in range(length):
            # Hugging Face: causal_mask_function and sliding_window_overlay.
            mask[i, kv_idx] = kv_idx <= q_idx and (window is None or kv_idx > q_idx - window)
    k = k.double().repeat_interleave(group, dim=1)                          # [L, H, D]
    v = v.double().repeat_interleave(group, dim=1)
    scores = scale * torch.einsum("nhd,lhd->hnl", q.double(), k)           # [H, n, L]
    probs = scores.masked_fill(~mask, -math.inf).softmax(dim=-1)
    return torch.einsum("hnl,lhd->nhd", probs, v)                          # [n, H, D]


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size,group,window", [(16, 1, None), (5, 4, None), (5, 2, 6),
                                                    (16, 8, 1), (16, 4, 20)])
def test_reference_matches_dense_attention(page_size, group, window):
    batch = make_batch([(0, 37), (2, 3), (60, 4), (0, 1)], page_size=page_size, group=group,
                       head_dim=32)
    got = reference(batch, window)
    for s in range(len(batch.keys)):
        rows = batch.seq_ids == s
        length = int(batch.positions[rows].max()) + 1
        expected = dense_attention(batch.q[rows], batch.keys[s][:length],
                                   batch.values[s][:length], batch.positions[rows], batch.scale,
                                   window)
        torch.testing.assert_close(got[rows], expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 7])
def test_sliding_window_semantics_match_transformers(window):
    masking_utils = pytest.importorskip("transformers.masking_utils")
    hf_mask = masking_utils.sliding_window_causal_mask_function(window)
    kv_idx = torch.arange(20)
    for pos in range(20):
        lo = max(0, pos - window + 1)  # the documented semantics
        theirs = hf_mask(torch.tensor(0), torch.tensor(0), torch.tensor(pos), kv_idx)
        assert theirs.tolist() == [lo <= j <= pos for j in range(20)]


# --------------------------------------------------------------------------------------------
# Kernels against the oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(impl, case):
    params = dict(CASES[case])
    window = params.pop("window", None)
    batch = make_batch(**params)
    out = run_impl(impl, batch, window)
    torch.testing.assert_close(out, reference(batch, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_q_and_out(impl):
    """q sliced out of a fused QKV projection, out a row-strided view of a wider buffer."""
    batch = make_batch(MIXED, page_size=5, group=4, head_dim=32)
    num_tokens, num_heads, head_dim = batch.q.shape
    width = num_heads * head_dim
    qkv = torch.randn(num_tokens, width + 4 * head_dim)
    qkv[:, :width] = batch.q.flatten(1)
    q = qkv[:, :width].view(num_tokens, num_heads, head_dim)
    buffer = torch.full((num_tokens, width + 5), NAN)
    out = buffer[:, :width].view(num_tokens, num_heads, head_dim)
    assert not q.is_contiguous() and not out.is_contiguous()

    IMPLS[impl](q, *batch.args()[1:], out)
    torch.testing.assert_close(out, reference(batch), rtol=1e-5, atol=1e-5)
    assert buffer[:, width:].isnan().all()  # nothing written outside the view


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3),
                                       (torch.float64, 1e-6)])
@pytest.mark.parametrize("impl", ["torch", "dispatch"])
def test_other_dtypes_take_torch_path(impl, dtype, tol, monkeypatch):
    monkeypatch.setattr(pa_module, "_numba_attention", None)  # must not be reached
    batch = make_batch(MIXED, page_size=16, group=4, head_dim=64, dtype=dtype)
    out = run_impl(impl, batch, window=12)
    assert out.dtype == dtype
    # The reference upcasts the same (rounded) inputs, so this measures only compute error.
    torch.testing.assert_close(out.float(), reference(batch, 12), rtol=tol, atol=tol)


def test_torch_path_without_enable_gqa(monkeypatch):
    """torch 2.4 has no enable_gqa: the fallback repeats kv heads."""
    monkeypatch.setattr(pa_module, "_HAS_ENABLE_GQA", False)
    batch = make_batch(MIXED, page_size=5, group=8, head_dim=32)
    torch.testing.assert_close(run_impl("torch", batch), reference(batch), rtol=1e-5, atol=1e-5)


def test_torch_path_splits_short_runs_over_gather_budget(monkeypatch):
    # Budget of ~3 pages of K: the 33 decode sequences need many SDPA calls.
    monkeypatch.setattr(pa_module, "_TORCH_GATHER_BUDGET", 3 * 16 * 2 * 64)
    batch = make_batch(**CASES["decode-b33"])
    batches = list(pa_module._run_batches(
        pa_module._find_runs(batch.seq_ids.numpy(), batch.positions.numpy(), 16, None),
        16 * 2 * 64))
    assert len(batches) > 5
    torch.testing.assert_close(run_impl("torch", batch), reference(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    batch = make_batch([(5, 0), (3, 1)], page_size=5, group=2, head_dim=32)
    empty = [x[:0] for x in (batch.q, batch.seq_ids, batch.positions)]
    args = (empty[0], batch.k_cache, batch.v_cache, batch.block_tables, empty[1], empty[2],
            batch.scale)
    assert IMPLS[impl](*args, torch.empty(0, 4, 32)).shape == (0, 4, 32)
    assert paged_attention_reference(*args).shape == (0, 4, 32)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_batches(data):
    page_size = data.draw(st.sampled_from([1, 3, 5, 16]))
    segments = data.draw(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 20)),
                                  min_size=1, max_size=6))
    window = data.draw(st.one_of(st.none(), st.integers(1, 30)))
    batch = make_batch(segments, page_size=page_size, group=data.draw(st.sampled_from([1, 2, 4])),
                       head_dim=data.draw(st.sampled_from([8, 32])),
                       num_kv_heads=data.draw(st.sampled_from([1, 2])),
                       seed=data.draw(st.integers(0, 2**16)),
                       shuffle_tokens=data.draw(st.booleans()))
    expected = reference(batch, window)
    for impl in IMPLS:
        torch.testing.assert_close(run_impl(impl, batch, window), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The dispatcher's routing
# --------------------------------------------------------------------------------------------


def spy_on_paths(monkeypatch):
    calls = {"numba": [], "torch": []}
    numba_path, torch_path = pa_module._numba_attention, pa_module._torch_attention

    def numba_spy(*args, **kwargs):
        tokens = kwargs.get("tokens", args[9] if len(args) > 9 else None)
        calls["numba"].append(None if tokens is None else tokens.tolist())
        return numba_path(*args, **kwargs)

    def torch_spy(*args, **kwargs):
        calls["torch"].append(args[5].length.tolist())
        return torch_path(*args, **kwargs)

    monkeypatch.setattr(pa_module, "_numba_attention", numba_spy)
    monkeypatch.setattr(pa_module, "_torch_attention", torch_spy)
    return calls


def test_dispatcher_splits_decode_and_prefill(monkeypatch):
    calls = spy_on_paths(monkeypatch)
    batch = make_batch(MIXED, page_size=5, group=4, head_dim=32)
    run_impl("dispatch", batch)
    lengths = [new for _, new in MIXED]
    starts = np.cumsum([0] + lengths[:-1])
    short = [range(a, a + n) for a, n in zip(starts, lengths) if n < PREFILL_RUN_THRESHOLD]
    assert calls["numba"] == [[t for r in short for t in r]]
    assert calls["torch"] == [[n for n in lengths if n >= PREFILL_RUN_THRESHOLD]]


@pytest.mark.parametrize("segments,expected", [
    ([(10, 1), (20, 1), (3, 1)], {"numba": [None], "torch": []}),
    ([(0, 30), (7, PREFILL_RUN_THRESHOLD)], {"numba": [], "torch": [[30, PREFILL_RUN_THRESHOLD]]}),
])
def test_dispatcher_single_path_batches(segments, expected, monkeypatch):
    calls = spy_on_paths(monkeypatch)
    batch = make_batch(segments, page_size=16, group=2, head_dim=32)
    torch.testing.assert_close(run_impl("dispatch", batch), reference(batch), rtol=1e-5,
                               atol=1e-5)
    assert calls == expected


# --------------------------------------------------------------------------------------------
# kv_append
# --------------------------------------------------------------------------------------------


def empty_cache(num_pages=6, page_size=5, num_kv_heads=2, head_dim=8):
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    return torch.zeros(shape), torch.zeros(shape)


def test_kv_append_round_trip():
    k_cache, v_cache = empty_cache()
    gen = torch.Generator().manual_seed(1)
    slots = torch.randperm(30, generator=gen)[:17]
    key, value = torch.randn(17, 2, 8, generator=gen), torch.randn(17, 2, 8, generator=gen)
    kv_append(key, value, k_cache, v_cache, slots)
    pages, offsets = slots // 5, slots % 5
    assert torch.equal(k_cache[pages, offsets], key)
    assert torch.equal(v_cache[pages, offsets], value)
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.view(30, 2, 8)[untouched].any()
    assert not v_cache.view(30, 2, 8)[untouched].any()


@pytest.mark.parametrize("writer", ["kv_append", "_kv_write_masked", "_kv_write_sync_free"])
@pytest.mark.parametrize("slots", [[4, -1, 29, 0, -1, 7], [-1, -1, 3], [-1, -1], [2, 9, 1]])
def test_kv_append_skips_negative_slots(writer, slots):
    """Both internal writers (the CPU one and the sync-free one for devices) agree."""
    k_cache, v_cache = (torch.randn(6, 5, 2, 8) for _ in range(2))  # every slot distinct
    slot_mapping = torch.tensor(slots)
    key, value = torch.randn(len(slots), 2, 8), torch.randn(len(slots), 2, 8)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for t, slot in enumerate(slots):
        if slot >= 0:
            expected_k[slot // 5, slot % 5] = key[t]
            expected_v[slot // 5, slot % 5] = value[t]
    if writer == "kv_append":
        kv_append(key, value, k_cache, v_cache, slot_mapping)
    else:
        getattr(pa_module, writer)(key, value, k_cache.view(30, 2, 8), v_cache.view(30, 2, 8),
                                   slot_mapping)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


def test_kv_append_then_attend_matches_dense():
    """End to end: a prompt and a decode step written with kv_append, then attended."""
    gen = torch.Generator().manual_seed(2)
    page_size, num_kv_heads, head_dim, num_heads = 5, 2, 32, 8
    k_cache, v_cache = empty_cache(num_pages=10, page_size=page_size, num_kv_heads=num_kv_heads,
                                   head_dim=head_dim)
    block_tables = torch.tensor([[7, 2, 9, 0, -1], [4, 1, 8, -1, -1]], dtype=torch.int32)
    lengths = [19, 11]
    keys = [torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in lengths]
    values = [torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in lengths]
    for s, n in enumerate(lengths):
        pos = torch.arange(n)
        slots = block_tables[s, pos // page_size].long() * page_size + pos % page_size
        # A padding token rides along and must be skipped.
        kv_append(torch.cat([keys[s], torch.ones(1, num_kv_heads, head_dim)]),
                  torch.cat([values[s], torch.ones(1, num_kv_heads, head_dim)]),
                  k_cache, v_cache, torch.cat([slots, torch.tensor([-1])]))
    # Sequence 0 prefills its last 14 tokens, sequence 1 decodes its last one.
    seq_ids = torch.tensor([0] * 14 + [1], dtype=torch.int32)
    positions = torch.cat([torch.arange(5, 19), torch.tensor([10])])
    q = torch.randn(15, num_heads, head_dim, generator=gen)
    out = torch.full_like(q, NAN)
    paged_attention(q, k_cache, v_cache, block_tables, seq_ids, positions, 0.2, out)
    expected = torch.cat([
        dense_attention(q[:14], keys[0], values[0], positions[:14], 0.2, None),
        dense_attention(q[14:], keys[1], values[1], positions[14:], 0.2, None)])
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def small_args():
    batch = make_batch([(6, 1), (0, 4)], page_size=5, group=2, head_dim=8)
    args = dict(zip(["q", "k_cache", "v_cache", "block_tables", "seq_ids", "positions", "scale"],
                    batch.args()))
    args["out"] = torch.empty_like(batch.q)
    return args


BAD_ATTENTION_ARGS = {
    "q 2-D": (dict(q=lambda a: a["q"][0]), "q: expected a 3-D tensor"),
    "q not a tensor": (dict(q=lambda a: a["q"].numpy()), "q: expected a torch.Tensor"),
    "q int": (dict(q=lambda a: a["q"].int()), "q: expected a floating-point dtype"),
    "k_cache dtype": (dict(k_cache=lambda a: a["k_cache"].double()), "k_cache: expected dtype"),
    "k_cache 3-D": (dict(k_cache=lambda a: a["k_cache"][0]), "k_cache: expected a 4-D tensor"),
    "k_cache strided": (dict(k_cache=lambda a: a["k_cache"].transpose(0, 1)),
                        "k_cache: expected a contiguous tensor"),
    "v_cache shape": (dict(v_cache=lambda a: a["v_cache"][:-1]), "v_cache: expected shape"),
    "head_dim": (dict(q=lambda a: a["q"][..., :4], out=lambda a: a["out"][..., :4]),
                 "k_cache: expected head_dim 4"),
    "head ratio": (dict(q=lambda a: a["q"][:, :3], out=lambda a: a["out"][:, :3]),
                   "q: expected num_heads \\(3\\) to be a multiple of num_kv_heads \\(2"),
    "block_tables int64": (dict(block_tables=lambda a: a["block_tables"].long()),
                           "block_tables: expected dtype torch.int32"),
    "block_tables 1-D": (dict(block_tables=lambda a: a["block_tables"][0]),
                         "block_tables: expected a 2-D tensor"),
    "seq_ids int64": (dict(seq_ids=lambda a: a["seq_ids"].long()),
                      "seq_ids: expected dtype torch.int32"),
    "seq_ids length": (dict(seq_ids=lambda a: a["seq_ids"][1:]), "seq_ids: expected length T=5"),
    "positions int32": (dict(positions=lambda a: a["positions"].int()),
                        "positions: expected dtype torch.int64"),
    "positions 2-D": (dict(positions=lambda a: a["positions"][None]),
                      "positions: expected a 1-D tensor"),
    "out shape": (dict(out=lambda a: a["out"][1:]), "out: expected shape \\(5, 4, 8\\)"),
    "out dtype": (dict(out=lambda a: a["out"].double()), "out: expected dtype torch.float32"),
    "device": (dict(block_tables=lambda a: a["block_tables"].to("meta")),
               "block_tables: expected device cpu"),
    "scale": (dict(scale=lambda a: "0.5"), "scale: expected a real number"),
    "window 0": (dict(sliding_window=lambda a: 0), "sliding_window: expected None or an int >= 1"),
    "window float": (dict(sliding_window=lambda a: 2.5), "sliding_window: expected None or an int"),
    "seq id range": (dict(seq_ids=lambda a: a["seq_ids"] + 1), "seq_ids: expected values in"),
    "negative position": (dict(positions=lambda a: a["positions"] - 1),
                          "positions: expected non-negative"),
    "position past table": (dict(positions=lambda a: a["positions"] + 20),
                            "positions: position .* needs page column"),
    "padding page read": (dict(block_tables=lambda a: torch.where(
        torch.arange(3) == 1, -1, a["block_tables"]).int()), "block_tables: expected page ids"),
    "page past cache": (dict(block_tables=lambda a: a["block_tables"] + 100),
                        "block_tables: expected page ids in \\[0, 6\\)"),
}


@pytest.mark.parametrize("case,fn", [
    (case, fn) for case, (changes, _) in BAD_ATTENTION_ARGS.items()
    for fn in ["numba", "torch", "dispatch", "reference"]
    if not (fn == "reference" and set(changes) == {"out"})  # the reference has no `out`
])
def test_bad_attention_args(case, fn):
    args = small_args()
    changes, message = BAD_ATTENTION_ARGS[case]
    args.update({name: change(args) for name, change in changes.items()})
    if fn == "reference":
        del args["out"]
    call = paged_attention_reference if fn == "reference" else IMPLS[fn]
    with pytest.raises(ValueError, match=message):
        call(**args)


def test_numba_path_rejects_other_dtypes():
    args = {k: v.bfloat16() if k in ("q", "k_cache", "v_cache", "out") else v
            for k, v in small_args().items()}
    with pytest.raises(ValueError, match="q: paged_attention_numba expects float32 CPU"):
        paged_attention_numba(**args)


BAD_APPEND_ARGS = {
    "key 2-D": (dict(key=lambda a: a["key"][0]), "key: expected a 3-D tensor"),
    "key heads": (dict(key=lambda a: a["key"][:, :1]), "key: expected \\[T, 2, 8\\]"),
    "value dtype": (dict(value=lambda a: a["value"].double()), "value: expected dtype"),
    "value rows": (dict(value=lambda a: a["value"][1:]), "value: expected T=3 rows"),
    "cache dtype": (dict(k_cache=lambda a: a["k_cache"].double()), "k_cache: expected dtype"),
    "cache shapes": (dict(v_cache=lambda a: a["v_cache"][1:]), "v_cache: expected shape"),
    "cache strided": (dict(v_cache=lambda a: a["v_cache"].transpose(0, 1)),
                      "v_cache: expected a contiguous"),
    "slot dtype": (dict(slot_mapping=lambda a: a["slot_mapping"].int()),
                   "slot_mapping: expected dtype torch.int64"),
    "slot length": (dict(slot_mapping=lambda a: a["slot_mapping"][1:]),
                    "slot_mapping: expected length T=3"),
    "device": (dict(slot_mapping=lambda a: a["slot_mapping"].to("meta")),
               "slot_mapping: expected device cpu"),
    "slot past cache": (dict(slot_mapping=lambda a: a["slot_mapping"] + 28),
                        "slot_mapping: expected slots < num_pages \\* page_size = 30"),
}


@pytest.mark.parametrize("case", BAD_APPEND_ARGS)
def test_bad_kv_append_args(case):
    k_cache, v_cache = empty_cache()
    args = dict(key=torch.randn(3, 2, 8), value=torch.randn(3, 2, 8), k_cache=k_cache,
                v_cache=v_cache, slot_mapping=torch.tensor([0, 1, 2]))
    changes, message = BAD_APPEND_ARGS[case]
    args.update({name: change(args) for name, change in changes.items()})
    with pytest.raises(ValueError, match=message):
        kv_append(**args)
