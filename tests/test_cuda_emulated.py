"""The CUDA paged attention kernels' logic, run on the CPU.

cuda/src/kernels/attention_kernel.cuh is compiled as host C++ against cuda/emulator/
warp_emulator.h (a CTA's threads as fibers; MMA, ldmatrix, shuffles and cp.async emulated with
the PTX ISA's fragment layouts; cp.async data lands only at its wait) and run on cases of
tests/test_cuda_attention.py, then compared with the float64 reference. This checks the kernel's
index arithmetic, masks, tiling, split-KV merge and pipeline ordering on machines without a GPU.
It needs nvcc (as the compiler driver, for the CUDA headers), not a GPU. It cannot show that the
emulated layouts are the hardware's, timing-dependent races, or speed: the GPU tests do those.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from test_cuda_attention import (BATCHES, AttentionCase, assert_attention_close,
                                 invalid_metadata_case, make_case)

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "cuda/emulator/attention_emulator.cpp", REPO / "cuda/src/attention_plan.cpp"]
INCLUDES = ["cuda/include", "cuda/src", "cuda/src/kernels", "cuda/emulator"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA headers)"),
]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("emulator") / "attention_emulator"
    cmd = ["nvcc", "-x", "c++", "-std=c++17", "-O2", "-DNANORUN_WARP_EMULATOR",
           *(f"-I{REPO / d}" for d in INCLUDES), *map(str, SOURCES), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, f"building the emulator failed:\n{build.stderr}"
    return exe


def _storage(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under a view that starts at its beginning, as a flat tensor."""
    assert t.storage_offset() == 0
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())


def _write(path: Path, t: torch.Tensor) -> None:
    flat = t.contiguous()
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.view(torch.int16)
    flat.numpy().tofile(path)


def run_emulated(exe: Path, case: AttentionCase, workdir: Path, *, max_ctas: int,
                 workspace_floats: int = 1 << 20) -> tuple[torch.Tensor, dict]:
    """out [T, Hq, D] (a strided view) and the plan {splits, grid, items}."""
    q, k = case.q, case.k_cache
    out = case.poisoned_out()
    meta = dict(bf16=int(q.dtype == torch.bfloat16), tokens=q.shape[0], heads=q.shape[1],
                kv_heads=k.shape[2], head_dim=q.shape[2], num_pages=k.shape[0],
                page_size=k.shape[1], num_seqs=case.block_tables.shape[0],
                max_pages=case.block_tables.shape[1],
                block_table_stride=case.block_tables.stride(0),
                q_token_stride=q.stride(0), q_head_stride=q.stride(1),
                out_token_stride=out.stride(0), out_head_stride=out.stride(1), scale=case.scale,
                sliding_window=case.sliding_window or 0, max_ctas=max_ctas,
                workspace_floats=workspace_floats)
    (workdir / "meta.txt").write_text("".join(f"{k} {v!r}\n" for k, v in meta.items()))
    tensors = dict(q=_storage(q), k_cache=k, v_cache=case.v_cache, block_tables=case.block_tables,
                   seq_ids=case.seq_ids, positions=case.positions, out=_storage(out))
    for name, t in tensors.items():
        _write(workdir / f"{name}.bin", t)
    run = subprocess.run([str(exe), str(workdir)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"the emulated kernel failed:\n{run.stderr}"

    raw = torch.from_numpy(np.fromfile(workdir / "out.bin", dtype=np.int16)).view(q.dtype)
    result = raw.as_strided(out.shape, out.stride())
    splits, grid, items = (int(x) for x in (workdir / "plan.txt").read_text().split())
    return result, dict(splits=splits, grid=grid, items=items)


# A smaller mixed batch than BATCHES["mixed"]: emulated MMAs are slow.
MIXED = [(49, 1), (0, 37), (100, 20), (16, 1), (5, 3), (63, 30)]

# (name, runs, Hq, Hkv, D, dtype, page_size, window, max_ctas): every group shape, head dim and
# dtype, odd page sizes, windows, tile boundaries, split-KV and tight budgets.
CASES = [
    ("decode, group 4", BATCHES["decode-7"][:5], 8, 2, 64, torch.float16, 16, None, 3),
    ("decode, split-KV", BATCHES["decode-7"][:5], 8, 2, 64, torch.float16, 16, None, 64),
    ("mixed, group 8, D=128", MIXED, 16, 2, 128, torch.bfloat16, 16, None, 5),
    ("mixed, group 1, page 5, window", MIXED, 2, 2, 32, torch.bfloat16, 5, 7, 4),
    ("mixed, group 4, window", MIXED, 8, 2, 64, torch.float16, 16, 20, 64),
    ("mixed, group 7", MIXED[:5], 28, 4, 64, torch.float16, 16, None, 6),
    ("group 128: two row blocks", [(9, 1), (20, 3)], 128, 1, 32, torch.float16, 8, None, 4),
    ("long decode, split, window", [(700, 1), (300, 1)], 16, 2, 128, torch.bfloat16, 16, 100, 40),
    ("prefill tiles from mid-block", [(5, 40), (0, 17), (60, 1)], 8, 8, 64, torch.bfloat16, 16,
     None, 2),
]


@pytest.mark.parametrize("name,runs,heads,kv_heads,head_dim,dtype,page_size,window,max_ctas",
                         CASES, ids=[c[0] for c in CASES])
def test_emulated_kernel_matches_reference(emulator, tmp_path, name, runs, heads, kv_heads,
                                           head_dim, dtype, page_size, window, max_ctas):
    case = make_case(runs, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                     page_size=page_size, sliding_window=window)
    out, plan = run_emulated(emulator, case, tmp_path, max_ctas=max_ctas)
    assert plan["grid"] <= max_ctas
    assert_attention_close(out, case.reference(), case, f"{name} (plan {plan})")


def test_emulated_split_kv_is_used_and_merges(emulator, tmp_path):
    case = make_case([(1000, 1)], heads=8, kv_heads=2, head_dim=64, dtype=torch.float16)
    out, plan = run_emulated(emulator, case, tmp_path, max_ctas=32)
    assert plan["splits"] == 16
    assert_attention_close(out, case.reference(), case, f"plan {plan}")


def test_emulated_invalid_metadata_gives_nan_rows(emulator, tmp_path):
    case, bad, valid = invalid_metadata_case()
    ref = case.reference()
    for max_ctas in (3, 64):               # without and with split-KV
        out, plan = run_emulated(emulator, bad, tmp_path, max_ctas=max_ctas)
        assert torch.isnan(out[0]).all() and torch.isnan(out[-1]).all(), plan
        assert_attention_close(out[1:-1], ref[1:-1], valid, f"valid tokens, plan {plan}")
