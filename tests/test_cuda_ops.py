"""nanorun.cuda_ops: each CUDA kernel against a plain fp32 torch reference.

GPU tests run only where nanorun._cuda was built and a device is visible. Outputs are poisoned
with NaN first, so an element the kernel forgot to write fails the comparison. The last tests
need only the built module (no GPU): argument validation happens before any CUDA call.
"""

from __future__ import annotations

import pytest
import torch

from nanorun import cuda_ops

requires_kernels = pytest.mark.skipif(
    not cuda_ops.available(), reason="nanorun._cuda not built or no CUDA device"
)

TOKENS = [1, 7, 33, 257]
HIDDEN = [111, 4096]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Kernel (one rounding of an fp32 result) vs the unrounded fp32 reference.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
EPS = 1e-6


def _randn(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device="cuda")


def _strided_rows(t: torch.Tensor, pad: int = 13) -> torch.Tensor:
    """The same values as t [N, H] in a view whose rows are `pad` elements apart further."""
    wide = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype, device="cuda")
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()


# ---------------------------------------------------------------------------------------------
# kv_append
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("heads,head_dim", [(1, 111), (8, 128)])
@pytest.mark.parametrize("T", TOKENS)
def test_kv_append(T, heads, head_dim, dtype):
    page_size = 16
    num_pages = T // page_size + 3
    num_q_heads = 2 * heads
    # key/value as views into a fused QKV output: token stride != heads * head_dim.
    qkv = _randn(T, (num_q_heads + 2 * heads) * head_dim, dtype=dtype)
    k_start, v_start = num_q_heads * head_dim, (num_q_heads + heads) * head_dim
    key = qkv[:, k_start:v_start].view(T, heads, head_dim)
    value = qkv[:, v_start:].view(T, heads, head_dim)
    assert not key.is_contiguous()

    shape = (num_pages, page_size, heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    g = torch.Generator().manual_seed(T)
    slots = torch.randperm(num_pages * page_size, generator=g)[:T]
    slots[::5] = -1  # padding tokens: skipped
    slot_mapping = slots.to("cuda")

    cuda_ops.kv_append(key, value, k_cache, v_cache, slot_mapping)
    torch.cuda.synchronize()

    k_flat = k_cache.view(-1, heads, head_dim)
    v_flat = v_cache.view(-1, heads, head_dim)
    written = slots >= 0
    dst = slots[written].cuda()
    assert torch.equal(k_flat[dst], key[written.cuda()])
    assert torch.equal(v_flat[dst], value[written.cuda()])
    untouched = torch.ones(k_flat.shape[0], dtype=torch.bool, device="cuda")
    untouched[dst] = False
    assert torch.isnan(k_flat[untouched]).all()
    assert torch.isnan(v_flat[untouched]).all()


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("cta_budget", [1, 3])
def test_kv_append_under_a_cta_budget(cta_budget):
    T, heads, head_dim, page_size = 33, 2, 64, 16
    key = _randn(T, heads, head_dim, dtype=torch.bfloat16, seed=12)
    value = _randn(T, heads, head_dim, dtype=torch.bfloat16, seed=13)
    k_cache = torch.full((4, page_size, heads, head_dim), float("nan"), dtype=torch.bfloat16,
                         device="cuda")
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.randperm(4 * page_size, generator=torch.Generator().manual_seed(1))[:T].cuda()
    cuda_ops.kv_append(key, value, k_cache, v_cache, slots, cta_budget=cta_budget)
    torch.cuda.synchronize()
    assert torch.equal(k_cache.view(-1, heads, head_dim)[slots], key)
    assert torch.equal(v_cache.view(-1, heads, head_dim)[slots], value)


@pytest.mark.gpu
@requires_kernels
def test_kv_append_skips_slots_past_the_end():
    k_cache = torch.zeros(2, 4, 1, 8, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    key = torch.ones(3, 1, 8, device="cuda")
    slot_mapping = torch.tensor([8, 1, 1 << 40], device="cuda")
    cuda_ops.kv_append(key, key, k_cache, v_cache, slot_mapping)
    torch.cuda.synchronize()
    assert k_cache.sum().item() == 8  # only slot 1 was written


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm(T, hidden, dtype, strided):
    x = _randn(T, hidden, dtype=dtype, scale=3.0, seed=1)
    weight = 1.0 + _randn(hidden, dtype=torch.float32, scale=0.1, seed=2).to(dtype)
    if strided:
        x = _strided_rows(x)
    out = torch.full((T, hidden), float("nan"), dtype=dtype, device="cuda")

    result = cuda_ops.rms_norm(x, weight, EPS, out=out)
    torch.cuda.synchronize()

    assert result is out
    torch.testing.assert_close(out.float(), _rms_norm_ref(x, weight), **TOL[dtype])


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rms_norm_in_place_and_leading_dims(dtype):
    x = _randn(3, 5, 111, dtype=dtype, seed=3)
    weight = _randn(111, dtype=dtype, seed=4)
    expected = _rms_norm_ref(x, weight)
    cuda_ops.rms_norm(x, weight, EPS, out=x)
    torch.testing.assert_close(x.float(), expected, **TOL[dtype])


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("strided", [False, True])
def test_fused_add_rms_norm(T, hidden, dtype, strided):
    x = _randn(T, hidden, dtype=dtype, seed=5)
    residual = _randn(T, hidden, dtype=dtype, scale=4.0, seed=6)
    weight = 1.0 + _randn(hidden, dtype=torch.float32, scale=0.1, seed=7).to(dtype)
    if strided:
        x, residual = _strided_rows(x), _strided_rows(residual, pad=3)
    new_residual = (x.float() + residual.float()).to(dtype)  # rounded once, like the kernel
    expected = _rms_norm_ref(new_residual, weight)

    cuda_ops.fused_add_rms_norm(x, residual, weight, EPS)
    torch.cuda.synchronize()

    assert torch.equal(residual, new_residual)
    torch.testing.assert_close(x.float(), expected, **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# SiLU-and-mul
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("inter", HIDDEN)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("strided", [False, True])
def test_silu_and_mul(T, inter, dtype, strided):
    x = _randn(T, 2 * inter, dtype=dtype, scale=4.0, seed=8)
    if strided:
        x = _strided_rows(x)
    out = torch.full((T, inter), float("nan"), dtype=dtype, device="cuda")

    result = cuda_ops.silu_and_mul(x, out=out)
    torch.cuda.synchronize()

    gate, up = x.float()[:, :inter], x.float()[:, inter:]
    assert result is out
    torch.testing.assert_close(out.float(), torch.nn.functional.silu(gate) * up, **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# Rotary embedding
# ---------------------------------------------------------------------------------------------


def _rotate_ref(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """fp32 "rotate half" of qk [T, H, Dh] with per-token cos/sin [T, Dh/2]."""
    x = qk.float()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _llama3_rope(max_len: int):
    """inv_freq and cos/sin tables of Llama 3.1 (llama3 rope scaling), as the model builds them."""
    from nanorun.models import get_preset
    from nanorun.models.llama import rope_inv_freq, rope_tables

    config = get_preset("llama-3-8b")
    assert config.rope_scaling is not None and config.rope_scaling.rope_type == "llama3"
    cos, sin = rope_tables(config, max_len, "cuda")
    return config, rope_inv_freq(config).cuda(), cos, sin


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("from_table", [True, False])
def test_rotary_embedding_with_llama3_scaling(T, dtype, from_table):
    max_len = 40000
    config, inv_freq, cos, sin = _llama3_rope(max_len)
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    # q and k heads of a fused QKV output: a strided view, as the model passes it.
    qkv = _randn(T, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=14)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(T, heads + kv_heads, head_dim)
    g = torch.Generator().manual_seed(T)
    positions = torch.randint(0, max_len, (T,), generator=g).cuda()
    expected = _rotate_ref(qk, cos[positions], sin[positions])
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()

    if from_table:
        cuda_ops.rotary_embedding(qk, positions, cos, sin)
    else:
        cuda_ops.rotary_embedding(qk, positions, inv_freq=inv_freq)
    torch.cuda.synchronize()

    # inv_freq computes sincos on the device: a few ulp from torch's tables in fp32.
    tol = TOL[dtype] if from_table or dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(qk.float(), expected, **tol)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # V untouched


@pytest.mark.gpu
@requires_kernels
def test_rotary_embedding_poisons_positions_outside_the_table():
    _, _, cos, sin = _llama3_rope(64)
    qk = _randn(3, 4, 128, dtype=torch.float16, seed=15)
    before = qk.clone()
    cuda_ops.rotary_embedding(qk, torch.tensor([5, 64, -1], device="cuda"), cos, sin)
    torch.cuda.synchronize()
    assert not torch.isnan(qk[0]).any() and not torch.equal(qk[0], before[0])
    assert torch.isnan(qk[1:]).all()


# ---------------------------------------------------------------------------------------------
# Streams, graphs, validation on the device
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_kernels
def test_kernels_are_graph_capturable():
    x = _randn(33, 2 * 111, dtype=torch.float16, seed=9)
    weight = _randn(111, dtype=torch.float16, seed=10)
    act = torch.empty(33, 111, dtype=torch.float16, device="cuda")
    out = torch.empty_like(act)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch recommends
        cuda_ops.silu_and_mul(x, out=act)
        cuda_ops.rms_norm(act, weight, EPS, out=out)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_ops.silu_and_mul(x, out=act)
        cuda_ops.rms_norm(act, weight, EPS, out=out)
    x.copy_(_randn(33, 2 * 111, dtype=torch.float16, seed=11))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()

    gate, up = x.float()[:, :111], x.float()[:, 111:]
    expected = _rms_norm_ref((torch.nn.functional.silu(gate) * up).half(), weight)
    torch.testing.assert_close(out.float(), expected, **TOL[torch.float16])


@pytest.mark.gpu
@requires_kernels
def test_device_validation_errors():
    x = _randn(4, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="weight must be float16"):
        cuda_ops.rms_norm(x, torch.ones(64, device="cuda"), EPS)
    with pytest.raises(ValueError, match="weight.shape"):
        cuda_ops.rms_norm(x, torch.ones(63, dtype=torch.float16, device="cuda"), EPS)
    with pytest.raises(ValueError, match="out"):
        cuda_ops.silu_and_mul(x, out=torch.empty(4, 31, dtype=torch.float16, device="cuda"))
    with pytest.raises(ValueError, match="x must have unit stride"):
        cuda_ops.rms_norm(x.t(), torch.ones(4, dtype=torch.float16, device="cuda"), EPS)
    weight = torch.ones(64, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="residual must be a CUDA tensor"):
        cuda_ops.fused_add_rms_norm(x, x.cpu(), weight, EPS)


# ---------------------------------------------------------------------------------------------
# No GPU needed: only the built module
# ---------------------------------------------------------------------------------------------


def test_tensor_arg_rejects_bad_descriptions():
    _cuda = pytest.importorskip("nanorun._cuda")
    with pytest.raises(ValueError, match="dtype 'float8'"):
        _cuda.TensorArg(0x1000, "float8", [2, 3], [3, 1], 0)
    with pytest.raises(ValueError, match="strides"):
        _cuda.TensorArg(0x1000, "float16", [2, 3], [1], 0)
    with pytest.raises(ValueError, match="at most 6 dims"):
        _cuda.TensorArg(0x1000, "float16", [1] * 7, [1] * 7, 0)
    arg = _cuda.TensorArg(0x1000, "bf16", [2, 3], [3, 1], 0)
    assert (arg.dtype, arg.shape, arg.strides, arg.device) == ("bfloat16", [2, 3], [3, 1], 0)


def test_validation_names_the_argument_without_touching_the_device():
    _cuda = pytest.importorskip("nanorun._cuda")

    def arg(dtype, *shape):  # contiguous; never dereferenced: validation fails first
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        return _cuda.TensorArg(0x1000, dtype, list(shape), strides, 0)

    key, cache, slots = arg("f16", 5, 2, 8), arg("f16", 4, 16, 2, 8), arg("i64", 5)
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        _cuda.kv_append(key, key, cache, cache, arg("i32", 5), 0, 0)
    with pytest.raises(ValueError, match=r"v_cache must have the shape of k_cache"):
        _cuda.kv_append(key, key, cache, arg("f16", 4, 16, 2, 9), slots, 0, 0)
    with pytest.raises(ValueError, match=r"k_cache.shape\[2\]"):
        bad_cache = arg("f16", 4, 16, 3, 8)
        _cuda.kv_append(key, key, bad_cache, bad_cache, slots, 0, 0)
    with pytest.raises(ValueError, match="x.shape\\[1\\] must be even"):
        _cuda.silu_and_mul(arg("f32", 3, 5), arg("f32", 3, 5), 0)
    with pytest.raises(ValueError, match="eps"):
        _cuda.rms_norm(arg("f32", 3, 5), arg("f32", 3, 5), arg("f32", 5), -1.0, 0)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cuda_ops.rms_norm(torch.ones(3, 5), torch.ones(5), EPS)
    with pytest.raises(ValueError, match="cta_budget"):
        _cuda.kv_append(key, key, cache, cache, slots, -1, 0)


def _fake(_cuda, dtype, *shape, strides=None, data=0x1000, device=0):
    """A TensorArg over memory that is never touched (validation fails first)."""
    if strides is None:
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
    return _cuda.TensorArg(data, dtype, list(shape), strides, device)


def _attention_args(_cuda, **override):
    """Valid paged_attention arguments (T=5, Hq=8, Hkv=2, D=64), with some replaced."""
    args = dict(
        q=_fake(_cuda, "bf16", 5, 8, 64), k_cache=_fake(_cuda, "bf16", 10, 16, 2, 64),
        v_cache=_fake(_cuda, "bf16", 10, 16, 2, 64), block_tables=_fake(_cuda, "i32", 3, 4),
        seq_ids=_fake(_cuda, "i32", 5), positions=_fake(_cuda, "i64", 5),
        out=_fake(_cuda, "bf16", 5, 8, 64), workspace=_fake(_cuda, "f32", 100), scale=0.125,
        sliding_window=0, cta_budget=0, stream=0)
    args.update(override)
    return args


@pytest.mark.parametrize("override,message", [
    (dict(q="2-D q"), r"q must have 3 dims, got shape \[5, 512\]"),
    (dict(positions="2-D positions"), "positions must have 1 dims"),
    (dict(q="float32 q"), "q must be float16 or bfloat16, got float32"),
    (dict(q=(5, 8, 80)), r"q.shape\[2\] \(head_dim\) must be 32, 64 or 128"),
    (dict(k_cache=(10, 16, 3, 64), v_cache=(10, 16, 3, 64)),
     r"q.shape\[1\] \(num_heads, 8\) must be a multiple of k_cache.shape\[2\]"),
    (dict(v_cache=(10, 16, 2, 32)), "v_cache must have the shape of k_cache"),
    (dict(k_cache="f16 k_cache"), "k_cache must be bfloat16, got float16"),
    (dict(k_cache="strided k_cache"), "k_cache must be contiguous"),
    (dict(k_cache="misaligned k_cache"), "k_cache's data must be 16-byte aligned"),
    (dict(q="odd q strides"), "q's token and head strides must be even"),
    (dict(block_tables="i64 block_tables"), "block_tables must be int32"),
    (dict(seq_ids=(4,)), r"seq_ids.shape\[0\] must be 5"),
    (dict(positions="i32 positions"), "positions must be int64"),
    (dict(out=(5, 8, 32)), "out must have the shape of q"),
    (dict(workspace="bf16 workspace"), "workspace must be float32"),
    (dict(scale=float("inf")), "scale must be finite"),
    (dict(sliding_window=-3), "sliding_window must be None or >= 1"),
    (dict(cta_budget=-1), "cta_budget must be None or >= 1"),
    (dict(seq_ids="host seq_ids"), "seq_ids must be a CUDA tensor, got host memory"),
    (dict(out="out on cuda:1"), "out is on cuda:1 but q is on cuda:0"),
])
def test_paged_attention_rejects_bad_arguments_without_touching_the_device(override, message):
    _cuda = pytest.importorskip("nanorun._cuda")
    fake = {
        "2-D q": _fake(_cuda, "bf16", 5, 512),
        "2-D positions": _fake(_cuda, "i64", 5, 1),
        "float32 q": _fake(_cuda, "f32", 5, 8, 64),
        "f16 k_cache": _fake(_cuda, "f16", 10, 16, 2, 64),
        "strided k_cache": _fake(_cuda, "bf16", 10, 16, 2, 64, strides=[4096, 128, 64, 1]),
        "misaligned k_cache": _fake(_cuda, "bf16", 10, 16, 2, 64, data=0x1008),
        "odd q strides": _fake(_cuda, "bf16", 5, 8, 64, strides=[513, 64, 1]),
        "i64 block_tables": _fake(_cuda, "i64", 3, 4),
        "i32 positions": _fake(_cuda, "i32", 5),
        "bf16 workspace": _fake(_cuda, "bf16", 100),
        "host seq_ids": _fake(_cuda, "i32", 5, device=-1),
        "out on cuda:1": _fake(_cuda, "bf16", 5, 8, 64, device=1),
    }
    dtypes = dict(q="bf16", k_cache="bf16", v_cache="bf16", seq_ids="i32", out="bf16")
    args = _attention_args(_cuda, **{
        name: fake[value] if isinstance(value, str)
        else _fake(_cuda, dtypes[name], *value) if isinstance(value, tuple) else value
        for name, value in override.items()})
    with pytest.raises(ValueError, match=message):
        _cuda.paged_attention(**args)
    args.pop("stream")
    with pytest.raises(ValueError, match=message):
        _cuda.paged_attention_plan(**args)


def test_paged_attention_rejects_cpu_tensors():
    pytest.importorskip("nanorun._cuda")
    q = torch.randn(3, 8, 64, dtype=torch.bfloat16)
    cache = torch.randn(4, 16, 2, 64, dtype=torch.bfloat16)
    args = (q, cache, cache, torch.zeros(1, 4, dtype=torch.int32),
            torch.zeros(3, dtype=torch.int32), torch.arange(3), 0.125, torch.empty_like(q))
    with pytest.raises(ValueError, match="q must be a CUDA tensor, got host memory"):
        cuda_ops.paged_attention(*args)
    with pytest.raises(ValueError, match="cta_budget must be None or an int >= 1"):
        cuda_ops.paged_attention(*args, cta_budget=0)
    with pytest.raises(ValueError, match="sliding_window must be None or an int >= 1"):
        cuda_ops.paged_attention(*args, sliding_window=1.5)


def test_rotary_embedding_rejects_bad_arguments():
    _cuda = pytest.importorskip("nanorun._cuda")
    qk, positions = _fake(_cuda, "bf16", 5, 12, 128), _fake(_cuda, "i64", 5)
    table = _fake(_cuda, "f32", 100, 64)
    with pytest.raises(ValueError, match=r"qk.shape\[2\] \(head_dim\) must be even"):
        _cuda.rotary_embedding(_fake(_cuda, "bf16", 5, 12, 7), positions, table, table, 0)
    with pytest.raises(ValueError, match="positions must be int64"):
        _cuda.rotary_embedding(qk, _fake(_cuda, "i32", 5), table, table, 0)
    with pytest.raises(ValueError, match=r"cos.shape\[1\] must be 64 \(half of qk.shape\[2\]\)"):
        _cuda.rotary_embedding(qk, positions, _fake(_cuda, "f32", 100, 32), table, 0)
    with pytest.raises(ValueError, match="sin must have the shape of cos"):
        _cuda.rotary_embedding(qk, positions, table, _fake(_cuda, "f32", 99, 64), 0)
    with pytest.raises(ValueError, match="inv_freq must be float32"):
        _cuda.rotary_embedding_inv_freq(qk, positions, _fake(_cuda, "bf16", 64), 0)
    with pytest.raises(ValueError, match="give cos and sin, or inv_freq"):
        cuda_ops.rotary_embedding(torch.ones(5, 12, 128), torch.arange(5))


def test_attention_plan_splits_only_what_leaves_the_budget_idle():
    _cuda = pytest.importorskip("nanorun._cuda")
    plan = _cuda.plan_paged_attention
    # The target batch fills any budget: no split-KV, the grid is the budget.
    big = plan(num_tokens=256, num_heads=32, num_kv_heads=8, head_dim=128, max_context=2048,
               max_ctas=264, workspace_floats=1 << 21)
    assert (big.splits, big.grid, big.items, big.combine_grid) == (1, 264, 2048, 0)
    # One long decode token: as many splits as fill the budget, at most 16.
    one = plan(1, 32, 8, 128, 5000, 264, 1 << 21)
    assert (one.splits, one.items, one.grid) == (16, 128, 128)
    assert one.workspace_floats == 16 * 32 * 129 and one.combine_grid == 8
    # ...no more than whole 64-position tiles of the longest context...
    assert plan(1, 32, 8, 128, 130, 264, 1 << 21).splits == 3
    # ...and no more than the workspace holds (none without one).
    assert plan(1, 32, 8, 128, 5000, 264, 3 * 32 * 129).splits == 3
    assert plan(1, 32, 8, 128, 5000, 264, 0).splits == 1
    # A small budget: the grid never exceeds it.
    small = plan(7, 16, 2, 64, 4096, 3, 1 << 21)
    assert small.grid == 3 and small.splits == 1
    # Groups beyond one CTA's 64 rows take several row blocks; prefill tiles shrink with groups.
    assert plan(4, 128, 1, 64, 64, 1000, 0).row_blocks == 2
    assert plan(4, 28, 4, 64, 64, 1000, 0).tile_tokens == 9


def test_select_kernels_on_the_cpu_is_nanorun_ops():
    from nanorun.kernels import CudaPagedAttention, select_kernels

    attention, kv_append = select_kernels(torch.device("cpu"))
    assert not attention.graph_safe and not kv_append.graph_safe
    assert CudaPagedAttention.supports(torch.bfloat16, 128)
    assert not CudaPagedAttention.supports(torch.float32, 128)
    assert not CudaPagedAttention.supports(torch.float16, 96)
