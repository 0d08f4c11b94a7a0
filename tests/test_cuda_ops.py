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
        _cuda.kv_append(key, key, cache, cache, arg("i32", 5), 0)
    with pytest.raises(ValueError, match=r"v_cache must have the shape of k_cache"):
        _cuda.kv_append(key, key, cache, arg("f16", 4, 16, 2, 9), slots, 0)
    with pytest.raises(ValueError, match=r"k_cache.shape\[2\]"):
        bad_cache = arg("f16", 4, 16, 3, 8)
        _cuda.kv_append(key, key, bad_cache, bad_cache, slots, 0)
    with pytest.raises(ValueError, match="x.shape\\[1\\] must be even"):
        _cuda.silu_and_mul(arg("f32", 3, 5), arg("f32", 3, 5), 0)
    with pytest.raises(ValueError, match="eps"):
        _cuda.rms_norm(arg("f32", 3, 5), arg("f32", 3, 5), arg("f32", 5), -1.0, 0)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cuda_ops.rms_norm(torch.ones(3, 5), torch.ones(5), EPS)
