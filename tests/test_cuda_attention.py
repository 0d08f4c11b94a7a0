"""CUDA paged attention (nanorun.cuda_ops.paged_attention and the callables of
nanorun.kernels.select_kernels) against the float64 reference of nanorun.ops.

Every case is built so that a wrong read shows: cache slots no token of the batch may see are
NaN, outputs are NaN before the call, pages are shuffled and block_tables has spare columns and
an unused row. GPU tests run only where nanorun._cuda is built and a device is visible; the same
cases run through the CPU warp emulator in tests/test_cuda_emulated.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from nanorun import cuda_ops
from nanorun.kernels import CudaPagedAttention, select_kernels
from nanorun.ops import paged_attention_reference

requires_kernels = pytest.mark.skipif(
    not cuda_ops.available(), reason="nanorun._cuda not built or no CUDA device"
)

# Kernel (fp32 accumulation, P rounded to the dtype for the P V product, output rounded once)
# against the float64 reference.
TOL = {torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.6e-2, 2e-2)}  # (atol, rtol)


@dataclass
class AttentionCase:
    """One batch: tokens (decode tokens and prompt-chunk runs) over a shuffled paged cache."""

    q: torch.Tensor             # [T, Hq, D], a strided view (every head of a fused QKV row)
    k_cache: torch.Tensor       # [P, page, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [S + 1, max_pages + 2] int32, -1 padded
    seq_ids: torch.Tensor       # [T] int32
    positions: torch.Tensor     # [T] int64
    scale: float
    sliding_window: int | None

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_ids,
                self.positions, self.scale)

    def to(self, device) -> "AttentionCase":
        moved = {f: getattr(self, f).to(device) for f in
                 ("k_cache", "v_cache", "block_tables", "seq_ids", "positions")}
        return replace(self, q=_strided_like(self.q, device), **moved)

    def reference(self) -> torch.Tensor:
        """[T, Hq, D] float32 on the CPU."""
        cpu = self.to("cpu")
        return paged_attention_reference(*cpu.args(), cpu.sliding_window)

    def poisoned_out(self, pad: int = 8) -> torch.Tensor:
        """NaN output [T, Hq, D] with rows `pad` elements apart further than contiguous."""
        T, H, D = self.q.shape
        wide = torch.full((T, H * D + pad), float("nan"), dtype=self.q.dtype, device=self.q.device)
        return wide[:, : H * D].view(T, H, D)


def _strided_like(q: torch.Tensor, device) -> torch.Tensor:
    """q's values on `device`, as the query part of a fused QKV row (token stride > H * D)."""
    T, H, D = q.shape
    qkv = torch.randn(T, (H + 4) * D, dtype=torch.float32).to(dtype=q.dtype, device=device)
    view = qkv[:, : H * D].view(T, H, D)
    view.copy_(q.to(device))
    return view


def make_case(runs, *, heads, kv_heads, head_dim, dtype, page_size=16, sliding_window=None,
              num_pages=None, seed=0) -> AttentionCase:
    """runs: one (cached, new) pair per sequence: `cached` positions already in the cache, then a
    run of `new` query tokens at positions cached..cached+new-1 (new = 1: a decode token).
    Their K/V are in the cache too (kv_append runs before attention). num_pages defaults to the
    pages needed plus 3 spare."""
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-(cached + new) // page_size) for cached, new in runs]
    num_pages = num_pages or sum(pages_per_seq) + 3
    order = torch.randperm(num_pages, generator=g).int()
    block_tables = torch.full((len(runs) + 1, max(pages_per_seq) + 2), -1, dtype=torch.int32)
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    seq_ids, positions, used = [], [], 0
    for s, ((cached, new), n_pages) in enumerate(zip(runs, pages_per_seq)):
        pages = order[used:used + n_pages]
        used += n_pages
        block_tables[s, :n_pages] = pages
        # Only positions some token of this run can see hold data; the rest stay NaN.
        lo = 0 if sliding_window is None else max(0, cached - sliding_window + 1)
        j = torch.arange(lo, cached + new)
        k_cache[pages[j // page_size].long(), j % page_size] = torch.randn(
            len(j), kv_heads, head_dim, generator=g)
        v_cache[pages[j // page_size].long(), j % page_size] = torch.randn(
            len(j), kv_heads, head_dim, generator=g)
        seq_ids += [s] * new
        positions += range(cached, cached + new)
    q = torch.randn(len(seq_ids), heads, head_dim, generator=g)
    return AttentionCase(
        q=_strided_like(q.to(dtype), "cpu"), k_cache=k_cache.to(dtype), v_cache=v_cache.to(dtype),
        block_tables=block_tables, seq_ids=torch.tensor(seq_ids, dtype=torch.int32),
        positions=torch.tensor(positions, dtype=torch.int64), scale=head_dim ** -0.5,
        sliding_window=sliding_window)


def invalid_metadata_case(device: str = "cpu") -> tuple[AttentionCase, AttentionCase,
                                                        AttentionCase]:
    """(case, bad, valid): bad is case with two broken tokens, the first naming no row of
    block_tables and the last reading a page past the cache; valid is case without those two,
    the tokens whose outputs must still match case.reference()[1:-1]."""
    case = make_case([(40, 1), (10, 20), (7, 1)], heads=8, kv_heads=2, head_dim=64,
                     dtype=torch.float16)
    if device != "cpu":
        case = case.to(device)
    seq_ids = case.seq_ids.clone()
    seq_ids[0] = 99                        # no such row of block_tables
    block_tables = case.block_tables.clone()
    block_tables[2, 0] = 1 << 20           # a page past the cache, read by the last token
    bad = replace(case, seq_ids=seq_ids, block_tables=block_tables)
    valid = replace(case, seq_ids=case.seq_ids[1:-1], positions=case.positions[1:-1])
    return case, bad, valid


def assert_attention_close(out: torch.Tensor, ref: torch.Tensor, case: AttentionCase,
                           what: str = "") -> None:
    """out vs the reference, with a message that says where it is worst (token, head, dim)."""
    out = out.float().cpu()
    atol, rtol = TOL[case.q.dtype]
    nan = torch.isnan(out)
    if nan.any():
        t, h, d = (int(i) for i in nan.nonzero()[0])
        raise AssertionError(f"{what}: {int(nan.sum())} NaN outputs, first at token {t} "
                             f"(seq {int(case.seq_ids[t])}, position {int(case.positions[t])}), "
                             f"head {h}, dim {d}")
    err = (out - ref).abs()
    excess = err - (atol + rtol * ref.abs())
    if (excess > 0).any():
        t, h, d = (int(i) for i in divmod_index(int(excess.argmax()), out.shape))
        raise AssertionError(
            f"{what}: max |out - ref| = {float(err.max()):.3g}; worst against the tolerance at "
            f"token {t} (seq {int(case.seq_ids[t])}, position {int(case.positions[t])}), head "
            f"{h}, dim {d}: {float(out[t, h, d]):.5g} vs {float(ref[t, h, d]):.5g}; "
            f"{int((excess > 0).sum())} of {out.numel()} elements out of tolerance")


def divmod_index(flat: int, shape) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def _random_decode(n: int, max_context: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(int(c), 1) for c in torch.randint(0, max_context, (n,), generator=g)]


# Batches of the awkward sizes; contexts not multiples of the page size.
BATCHES = {
    "decode-1-first-token": [(0, 1)],
    "decode-7": [(0, 1), (14, 1), (15, 1), (16, 1), (99, 1), (332, 1), (1000, 1)],
    "decode-33": _random_decode(33, 600, seed=1),
    "decode-257": _random_decode(257, 300, seed=2),
    "mixed": [(49, 1), (0, 37), (100, 64), (16, 1), (5, 3), (0, 1), (63, 130)],
}
GQA = [(2, 2), (8, 2), (16, 2)]  # (heads, kv_heads): groups 1, 4, 8


def _run(case: AttentionCase, **kwargs) -> torch.Tensor:
    out = case.poisoned_out()
    result = cuda_ops.paged_attention(*case.args(), out, case.sliding_window,
                                      workspace=_workspace(case), **kwargs)
    torch.cuda.synchronize()
    assert result is out
    return out


def _workspace(case: AttentionCase) -> torch.Tensor:
    return torch.full((1 << 21,), float("nan"), device=case.q.device)


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_attention_matches_reference(batch, heads, kv_heads, head_dim, dtype):
    case = make_case(BATCHES[batch], heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     dtype=dtype).to("cuda")
    assert_attention_close(_run(case), case.reference(), case,
                           f"{batch} Hq={heads} Hkv={kv_heads} D={head_dim} {dtype}")


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [5, 16, 32])
def test_head_dim_32_and_odd_page_sizes(page_size, dtype):
    case = make_case(BATCHES["mixed"], heads=8, kv_heads=2, head_dim=32, dtype=dtype,
                     page_size=page_size).to("cuda")
    assert_attention_close(_run(case), case.reference(), case, f"page_size={page_size}")


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(28, 4), (128, 1)])  # group 7; group 128 (2 row blocks)
def test_groups_that_do_not_divide_the_tile(heads, kv_heads, dtype):
    case = make_case(BATCHES["mixed"], heads=heads, kv_heads=kv_heads, head_dim=64,
                     dtype=dtype).to("cuda")
    assert_attention_close(_run(case), case.reference(), case, f"Hq={heads} Hkv={kv_heads}")


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 40, 4096])
def test_sliding_window(window, dtype):
    runs = BATCHES["mixed"] + [(3000, 1), (2000, 20)]
    case = make_case(runs, heads=8, kv_heads=2, head_dim=128, dtype=dtype,
                     sliding_window=window).to("cuda")
    assert_attention_close(_run(case), case.reference(), case, f"window={window}")


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("runs", [[(5000, 1)], [(3000, 1), (70, 1), (4095, 1)]])
def test_split_kv_on_long_contexts(runs, dtype):
    case = make_case(runs, heads=32, kv_heads=8, head_dim=128, dtype=dtype).to("cuda")
    out = case.poisoned_out()
    plan = cuda_ops.paged_attention_plan(*case.args(), out, workspace=_workspace(case))
    assert plan.splits > 1, f"expected split-KV for {len(runs)} tokens, got {plan.splits} split"
    assert_attention_close(_run(case), case.reference(), case, f"splits={plan.splits}")


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("cta_budget", [1, 3, 7, 66])
def test_cta_budget_bounds_the_grid_not_the_result(cta_budget):
    runs = BATCHES["mixed"] + [(2500, 1)]
    case = make_case(runs, heads=16, kv_heads=2, head_dim=128, dtype=torch.bfloat16).to("cuda")
    plan = cuda_ops.paged_attention_plan(*case.args(), case.poisoned_out(), None, cta_budget,
                                         _workspace(case))
    assert plan.grid <= cta_budget and plan.combine_grid <= cta_budget
    assert_attention_close(_run(case, cta_budget=cta_budget), case.reference(), case,
                           f"cta_budget={cta_budget}")


@pytest.mark.gpu
@requires_kernels
def test_without_workspace_there_is_no_split():
    case = make_case([(5000, 1)], heads=32, kv_heads=8, head_dim=128,
                     dtype=torch.float16).to("cuda")
    out = case.poisoned_out()
    assert cuda_ops.paged_attention_plan(*case.args(), out).splits == 1
    cuda_ops.paged_attention(*case.args(), out)
    torch.cuda.synchronize()
    assert_attention_close(out, case.reference(), case, "no workspace")


@pytest.mark.gpu
@requires_kernels
def test_invalid_metadata_gives_nan_rows_not_a_crash():
    case, bad, valid = invalid_metadata_case("cuda")
    ref = case.reference()
    out = _run(bad)
    assert torch.isnan(out[0]).all() and torch.isnan(out[-1]).all()
    assert_attention_close(out[1:-1], ref[1:-1], valid, "valid tokens next to invalid ones")


@pytest.mark.gpu
@requires_kernels
def test_empty_batch_is_a_no_op():
    case = make_case([(3, 1)], heads=8, kv_heads=2, head_dim=64, dtype=torch.float16).to("cuda")
    empty = replace(case, q=case.q[:0], seq_ids=case.seq_ids[:0], positions=case.positions[:0])
    cuda_ops.paged_attention(*empty.args(), empty.poisoned_out())


# ---------------------------------------------------------------------------------------------
# The callables the model uses
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_kernels
def test_select_kernels_returns_graph_safe_cuda_kernels():
    attention, kv_append = select_kernels(torch.device("cuda"))
    assert isinstance(attention, CudaPagedAttention)
    assert attention.graph_safe and kv_append.graph_safe


@pytest.mark.gpu
@requires_kernels
def test_graph_replay_with_a_new_batch_of_the_same_shapes():
    """Capture once on a decode-heavy batch, replay on a batch of the same shapes whose tokens
    form other runs (prompt chunks where decode tokens were) and other pages."""
    kwargs = dict(heads=16, kv_heads=2, head_dim=128, dtype=torch.bfloat16)
    first = make_case([(300, 1)] * 6 + [(40, 10)], seed=1, num_pages=200, **kwargs).to("cuda")
    second = make_case([(7, 4), (900, 1), (1, 11)], seed=2, num_pages=200, **kwargs).to("cuda")
    assert first.q.shape == second.q.shape
    attention, _ = select_kernels(torch.device("cuda"))

    # Static buffers, as a backend keeps them: the same storage for both batches.
    static = replace(first, k_cache=first.k_cache.clone(), v_cache=first.v_cache.clone(),
                     block_tables=torch.full((9, 70), -1, dtype=torch.int32, device="cuda"))
    static.block_tables[: first.block_tables.shape[0], : first.block_tables.shape[1]] = \
        first.block_tables
    out = static.poisoned_out()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attention(*static.args(), out, cta_budget=16)  # warm-up: allocates this stream's workspace
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            attention(*static.args(), out, cta_budget=16)
    torch.cuda.current_stream().wait_stream(side)

    for batch in (first, second):
        static.q.copy_(batch.q)
        static.k_cache.copy_(batch.k_cache)
        static.v_cache.copy_(batch.v_cache)
        static.block_tables.fill_(-1)
        static.block_tables[: batch.block_tables.shape[0], : batch.block_tables.shape[1]] = \
            batch.block_tables
        static.seq_ids.copy_(batch.seq_ids)
        static.positions.copy_(batch.positions)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_attention_close(out, batch.reference(), batch, "graph replay")


@pytest.mark.gpu
@requires_kernels
def test_float32_falls_back_to_nanorun_ops_outside_capture_only():
    attention, _ = select_kernels(torch.device("cuda"))
    case = make_case([(20, 1), (3, 5)], heads=4, kv_heads=2, head_dim=64,
                     dtype=torch.float32).to("cuda")
    out = case.poisoned_out()
    attention(*case.args(), out)
    torch.testing.assert_close(out.cpu(), case.reference(), atol=1e-4, rtol=1e-4)

    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="cannot be graph-captured"):
        with torch.cuda.graph(graph):
            attention(*case.args(), out)


@pytest.mark.gpu
@requires_kernels
def test_partition_sm_budget_bounds_the_grid():
    """Enqueued on a partition of S SMs (the CUDA backend sets current_sm_budget), the kernel's
    default budget is S x the CTAs per SM that fit, and the grid stays within it."""
    from nanorun.backends.cuda import _SM_BUDGET

    attention, _ = select_kernels(torch.device("cuda"))
    case = make_case([(2000, 1)] * 64, heads=32, kv_heads=8, head_dim=128,
                     dtype=torch.bfloat16, seed=3).to("cuda")
    device_sms = torch.cuda.get_device_properties(0).multi_processor_count
    per_sm = cuda_ops.paged_attention_capacity(case.q) // device_sms
    assert attention.partition_budget(case.q) is None  # no partition: the whole device
    token = _SM_BUDGET.set(16)
    try:
        budget = attention.partition_budget(case.q)
        out = case.poisoned_out()
        attention(*case.args(), out, case.sliding_window)
    finally:
        _SM_BUDGET.reset(token)
    assert budget == 16 * per_sm
    plan = cuda_ops.paged_attention_plan(*case.args(), out, case.sliding_window, budget,
                                         attention.workspace(case.q.device))
    assert 0 < plan.grid <= budget
    torch.cuda.synchronize()
    assert_attention_close(out, case.reference(), case, "16-SM partition")
