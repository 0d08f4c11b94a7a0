"""nanorun's plain CUDA kernels (rotary, kv_append, RMSNorm, fused add+RMSNorm, SiLU-and-mul),
run on the CPU through the emulator of their device code, against fp32 torch references.

Each kernel's .cu file (launcher included) is compiled as host C++: cuda/emulator/hostify.py
turns its `<<<...>>>` launches into calls of the emulator, cuda/emulator/kernel_emulator.h
supplies CUDA's built-ins (threadIdx, __syncthreads, warp shuffles, __shared__) over the fiber
CTAs of warp_emulator.h, and cuda/emulator/kernels_emulator.cpp calls the launchers of
nanorun/kernels.h on tensors this file writes. So the launchers' grid arithmetic (column
blocks, CTA budgets, striding over tokens), the kernels' index arithmetic over strided views,
their masks (padding slots, slots past the end, positions outside the table) and the block
reduction's barriers all run as on a GPU, at awkward sizes: odd token counts, hidden 111,
head dims 64 and 128, page sizes that do not divide the lengths, f32/f16/bf16.

Every output is poisoned (NaN, and a sentinel in the gaps of strided views) first; the gaps
must come back untouched, and each storage sits between guard bands the driver checks, so a
write outside a tensor fails the test. Needs nvcc (as the compiler driver, for the CUDA
headers), not a GPU. It cannot show timing races or speed: the GPU tests (test_cuda_ops.py) do.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
KERNELS = ["activation", "fused_norm", "kv_append", "rotary"]
INCLUDES = ["cuda/include", "cuda/src", "cuda/src/kernels", "cuda/emulator"]
DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
          torch.int32: "i32", torch.int64: "i64"}
# One rounding of an fp32 result, plus the host's expf/sincosf against torch's.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}
EPS = 1e-6
SENTINEL = 12345.0      # in the gaps of strided outputs: must survive

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA headers)"),
]


def _compile(src: Path, obj: Path) -> None:
    cmd = ["nvcc", "-x", "c++", "-std=c++17", "-O1", *(f"-I{REPO / d}" for d in INCLUDES), "-c",
           str(src), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"compiling {src.name} for the emulator failed:\n{done.stderr}"


def build_emulator(build: Path, mutation: tuple[str, str, str] | None = None) -> Path:
    """The emulator over the kernels' sources. `mutation` (file in cuda/src/kernels, old, new)
    replaces one text first: in a kernel's .cu, that kernel is recompiled; in a header
    (common.cuh), every kernel is, against the mutated copy beside them (a quoted include
    looks in the including file's folder first)."""
    sys.path.insert(0, str(REPO / "cuda" / "emulator"))
    from hostify import hostify
    sys.path.pop(0)
    kernels_dir = REPO / "cuda/src/kernels"
    mutant_dir = build / "mutant"
    recompile: set[str] = set()
    if mutation is not None:
        shutil.rmtree(mutant_dir, ignore_errors=True)
        mutant_dir.mkdir()
        file, old, new = mutation
        text = (kernels_dir / file).read_text()
        assert old in text, f"the mutation's text is not in {file}"
        text = text.replace(old, new, 1)
        if file.endswith(".cu"):
            recompile = {file.removesuffix(".cu")}
            (mutant_dir / file).write_text(text)
        else:
            recompile = set(KERNELS)
            (mutant_dir / file).write_text(text)
    objects = []
    for name in KERNELS:
        if name in recompile:
            source = mutant_dir / f"{name}.cu"
            text = source.read_text() if source.exists() else (kernels_dir / f"{name}.cu").read_text()
            src, obj = mutant_dir / f"{name}.cpp", mutant_dir / f"{name}.o"
        else:
            text = (kernels_dir / f"{name}.cu").read_text()
            src, obj = build / f"{name}.cpp", build / f"{name}.o"
        if not obj.exists():
            src.write_text(hostify(text))
            _compile(src, obj)
        objects.append(obj)
    driver = build / "driver.o"
    if not driver.exists():
        _compile(REPO / "cuda/emulator/kernels_emulator.cpp", driver)
    exe = (mutant_dir if mutation else build) / "kernels_emulator"
    link = subprocess.run(["nvcc", *map(str, objects), str(driver), "-o", str(exe)],
                          capture_output=True, text=True)
    assert link.returncode == 0, link.stderr
    return exe


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kernels_emulator")


@pytest.fixture(scope="module")
def emulator(build_dir) -> Path:
    return build_emulator(build_dir)


def run_kernel(exe: Path, workdir: Path, kernel: str, tensors: dict[str, torch.Tensor],
               **scalars) -> int:
    """Runs `kernel` on the tensors (views; tensors sharing a storage share it there too) and
    writes what the kernel left in each storage back into it. Returns the launcher's status."""
    storages: dict[int, tuple[str, torch.Tensor]] = {}
    lines = [f"kernel {kernel}"] + [f"scalar {k} {v!r}" for k, v in scalars.items()]
    for name, t in tensors.items():
        key = t.untyped_storage().data_ptr()
        if key not in storages:
            sid = f"s{len(storages)}"
            flat = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
            storages[key] = (sid, flat)
            flat.numpy().tofile(workdir / f"{sid}.bin")
            lines.append(f"storage {sid} {flat.numel()}")
        sid = storages[key][0]
        lines.append(f"tensor {name} {sid} {DTYPES[t.dtype]} {t.storage_offset()} {t.dim()} "
                     + " ".join(map(str, t.shape)) + " " + " ".join(map(str, t.stride())))
    (workdir / "spec.txt").write_text("\n".join(lines) + "\n")
    run = subprocess.run([str(exe), str(workdir)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"the emulated {kernel} failed:\n{run.stderr}"
    for sid, flat in storages.values():
        flat.copy_(torch.from_numpy(np.fromfile(workdir / f"{sid}.bin", dtype=np.uint8)))
    return int(run.stdout.split()[-1])


def _randn(*shape, dtype, seed, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _strided(t: torch.Tensor, pad: int = 13, fill: float = SENTINEL) -> torch.Tensor:
    """t's values in a view whose rows are `pad` elements further apart; the gaps hold fill."""
    wide = torch.full((t.shape[0], t.shape[1] + pad), fill, dtype=t.dtype)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def _gaps_untouched(view: torch.Tensor, pad: int = 13) -> bool:
    base = torch.empty(0, dtype=view.dtype).set_(view.untyped_storage())
    wide = base[: view.shape[0] * (view.shape[1] + pad)].view(view.shape[0], -1)
    return bool((wide[:, view.shape[1]:] == SENTINEL).all())


def _poisoned(shape, dtype, strided: bool) -> torch.Tensor:
    out = torch.full(shape, math.nan, dtype=dtype)
    return _strided(out) if strided else out


# -- RMSNorm and fused add + RMSNorm ---------------------------------------------------------------
def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()


NORM_CASES = [(1, 111, torch.float32, False), (7, 111, torch.bfloat16, True),
              (19, 1000, torch.float16, True), (3, 4096, torch.bfloat16, False),
              (2, 2049, torch.float16, False)]


@pytest.mark.parametrize("rows,hidden,dtype,strided", NORM_CASES)
def test_rms_norm(emulator, tmp_path, rows, hidden, dtype, strided):
    x = _randn(rows, hidden, dtype=dtype, seed=rows, scale=3.0)
    x = _strided(x) if strided else x
    weight = _randn(hidden, dtype=dtype, seed=1)
    out = _poisoned((rows, hidden), dtype, strided)
    assert run_kernel(emulator, tmp_path, "rms_norm", dict(out=out, x=x, weight=weight),
                      eps=EPS) == 0
    torch.testing.assert_close(out.float(), _rms_norm_ref(x, weight), **TOL[dtype])
    assert not strided or _gaps_untouched(out)


def test_rms_norm_in_place(emulator, tmp_path):
    x = _randn(5, 300, dtype=torch.bfloat16, seed=3)
    weight = _randn(300, dtype=torch.bfloat16, seed=4)
    want = _rms_norm_ref(x, weight)
    assert run_kernel(emulator, tmp_path, "rms_norm", dict(out=x, x=x, weight=weight),
                      eps=EPS) == 0
    torch.testing.assert_close(x.float(), want, **TOL[torch.bfloat16])


@pytest.mark.parametrize("rows,hidden,dtype,strided", NORM_CASES)
def test_fused_add_rms_norm(emulator, tmp_path, rows, hidden, dtype, strided):
    x = _randn(rows, hidden, dtype=dtype, seed=rows + 10, scale=2.0)
    residual = _randn(rows, hidden, dtype=dtype, seed=rows + 20)
    x, residual = (_strided(t) if strided else t for t in (x, residual))
    weight = _randn(hidden, dtype=dtype, seed=5)
    new_residual = (x.float() + residual.float()).to(dtype)     # rounded once, as documented
    want = _rms_norm_ref(new_residual, weight)
    assert run_kernel(emulator, tmp_path, "fused_add_rms_norm",
                      dict(x=x, residual=residual, weight=weight), eps=EPS) == 0
    assert torch.equal(residual, new_residual)      # bit for bit: the norm reads this
    torch.testing.assert_close(x.float(), want, **TOL[dtype])
    assert not strided or (_gaps_untouched(x) and _gaps_untouched(residual))


# -- SiLU and mul ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,inter,dtype,strided", [
    (1, 111, torch.float32, False), (7, 300, torch.bfloat16, True),
    (33, 257, torch.float16, False), (2, 1000, torch.float16, True)])
def test_silu_and_mul(emulator, tmp_path, rows, inter, dtype, strided):
    """inter > 256: several column blocks per row (grid.y)."""
    x = _randn(rows, 2 * inter, dtype=dtype, seed=inter, scale=3.0)
    x = _strided(x) if strided else x
    out = _poisoned((rows, inter), dtype, strided)
    assert run_kernel(emulator, tmp_path, "silu_and_mul", dict(out=out, x=x)) == 0
    gate, up = x.float()[:, :inter], x.float()[:, inter:]
    torch.testing.assert_close(out.float(), torch.nn.functional.silu(gate) * up, **TOL[dtype])
    assert not strided or _gaps_untouched(out)


def test_silu_and_mul_refuses_a_grid_too_tall(emulator, tmp_path):
    """More column blocks than grid.y holds: the launcher says so instead of launching."""
    inter = 256 * 65536
    x = torch.zeros(1, 2, dtype=torch.float16).as_strided((1, 2 * inter), (0, 0))
    out = torch.zeros(1, 1, dtype=torch.float16).as_strided((1, inter), (0, 0))
    assert run_kernel(emulator, tmp_path, "silu_and_mul", dict(out=out, x=x)) == -2


# -- rotary embedding ------------------------------------------------------------------------------
def _rotate_ref(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = qk.float()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _tables(head_dim: int, rows: int):
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(rows, dtype=torch.float32)[:, None] * inv_freq[None]   # fp32 product
    return inv_freq, angles.double().cos().float(), angles.double().sin().float()


@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,dtype,from_table", [
    (1, 4, 2, 64, torch.float32, True), (19, 4, 2, 64, torch.bfloat16, True),
    (7, 3, 1, 128, torch.float16, False), (19, 2, 2, 128, torch.bfloat16, False),
    (5, 8, 2, 64, torch.float16, True)])
def test_rotary_embedding(emulator, tmp_path, tokens, heads, kv_heads, head_dim, dtype,
                          from_table):
    """q and k heads of a fused QKV output (a strided view, as the model passes it); one
    position outside the table (table mode) or negative (inv_freq mode) poisons its token."""
    rows = 3000
    inv_freq, cos, sin = _tables(head_dim, rows)
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=tokens)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    g = torch.Generator().manual_seed(tokens)
    positions = torch.randint(0, rows, (tokens,), generator=g)
    bad = tokens // 2 if tokens > 1 else None
    if bad is not None:
        positions[bad] = rows if from_table else -1
    safe = positions.clamp(0, rows - 1)
    want = _rotate_ref(qk, cos[safe], sin[safe])
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    if from_table:
        status = run_kernel(emulator, tmp_path, "rotary_embedding",
                            dict(qk=qk, positions=positions, cos=cos, sin=sin))
    else:
        status = run_kernel(emulator, tmp_path, "rotary_embedding_inv_freq",
                            dict(qk=qk, positions=positions, inv_freq=inv_freq))
    assert status == 0
    good = [t for t in range(tokens) if t != bad]
    # inv_freq mode: sincosf of the fp32 angle on the host against float64 tables.
    tol = TOL[dtype] if from_table or dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(qk.float()[good], want[good], **tol)
    if bad is not None:
        assert torch.isnan(qk[bad].float()).all()
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)     # V untouched


# -- kv_append -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,kv_heads,head_dim,page_size,dtype,max_ctas", [
    (1, 2, 64, 16, torch.float16, 0), (19, 2, 64, 5, torch.bfloat16, 0),
    (7, 1, 128, 3, torch.float32, 2), (33, 3, 128, 16, torch.float16, 4)])
def test_kv_append(emulator, tmp_path, tokens, kv_heads, head_dim, page_size, dtype, max_ctas):
    """Keys and values as views into a fused QKV output; slots a scattered permutation with a
    padding token (-1) and one past the cache's end, both skipped; a CTA budget smaller than
    the token count makes each CTA stride over tokens."""
    heads = 2 * kv_heads
    num_pages = -(-tokens // page_size) + 2           # pages that the lengths do not fill
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=tokens)
    key = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    value = qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.full(shape, math.nan, dtype=dtype) for _ in range(2))
    g = torch.Generator().manual_seed(tokens + 1)
    slots = torch.randperm(num_pages * page_size, generator=g)[:tokens].clone()
    skipped = []
    if tokens > 2:
        slots[1], slots[-1] = -1, num_pages * page_size       # padding, past the end
        skipped = [1, tokens - 1]
    assert run_kernel(emulator, tmp_path, "kv_append",
                      dict(key=key, value=value, k_cache=k_cache, v_cache=v_cache,
                           slot_mapping=slots), max_ctas=max_ctas) == 0
    written = [t for t in range(tokens) if t not in skipped]
    for cache, src in ((k_cache, key), (v_cache, value)):
        flat = cache.view(-1, kv_heads, head_dim)
        assert torch.equal(flat[slots[written]], src[written])      # a copy: bit for bit
        untouched = torch.ones(flat.shape[0], dtype=torch.bool)
        untouched[slots[written]] = False
        assert torch.isnan(flat[untouched].float()).all()           # nothing else written


# -- the tests catch planted bugs ------------------------------------------------------------------
# (kernel file, text, replacement, a test above and its case): each must make that case fail.
MUTANTS = [
    ("common.cuh", "  if (lane == 0) warp_sums[warp] = v;\n  __syncthreads();",
     "  if (lane == 0) warp_sums[warp] = v;", test_rms_norm, (7, 111, torch.bfloat16, True)),
    ("fused_norm.cu", "block_sum(sum_sq) / hidden", "block_sum(sum_sq) / (hidden - 1)",
     test_rms_norm, (1, 111, torch.float32, False)),
    ("fused_norm.cu", "const T* in_row = kFused ? res_row : x_row;", "const T* in_row = x_row;",
     test_fused_add_rms_norm, (7, 111, torch.bfloat16, True)),
    ("activation.cu", "if (col >= inter) return;", "if (col > inter) return;",
     test_silu_and_mul, (7, 300, torch.bfloat16, True)),
    ("activation.cu", "int64_t{blockIdx.y} * blockDim.x", "int64_t{blockIdx.y} * 257",
     test_silu_and_mul, (2, 1000, torch.float16, True)),
    ("kv_append.cu", "slot >= num_slots", "slot > num_slots",
     test_kv_append, (33, 3, 128, 16, torch.float16, 4)),
    ("kv_append.cu", "t += gridDim.x", "t += gridDim.x + 1",
     test_kv_append, (7, 1, 128, 3, torch.float32, 2)),
    ("kv_append.cu", "offset * k_s.offset", "offset * k_s.head",
     test_kv_append, (19, 2, 64, 5, torch.bfloat16, 0)),
    ("rotary.cu", "pos < a.table_rows", "pos <= a.table_rows",
     test_rotary_embedding, (19, 4, 2, 64, torch.bfloat16, True)),
    ("rotary.cu", "x2 * c + x1 * s", "x2 * c - x1 * s",
     test_rotary_embedding, (7, 3, 1, 128, torch.float16, False)),
    ("rotary.cu", "T* row = qk + t * a.token_stride;", "T* row = qk + t * a.heads * a.half * 2;",
     test_rotary_embedding, (5, 8, 2, 64, torch.float16, True)),
]


@pytest.mark.parametrize("kernel,old,new,test,case", MUTANTS,
                         ids=[f"{m[0]}: {m[1]} -> {m[2]}" for m in MUTANTS])
def test_a_planted_bug_fails_its_case(emulator, build_dir, tmp_path, kernel, old, new, test,
                                      case):
    test(emulator, tmp_path, *case)                 # the case passes on the real kernel
    mutant = build_emulator(build_dir, (kernel, old, new))
    with pytest.raises(AssertionError):
        test(mutant, tmp_path, *case)
