"""layout="auto": the engine finds what `nanorun tune` wrote, by model, device and tensor-parallel
degree, and runs at the tuned batch size unless the user fixed max_batch_tokens.

Every test works in its own directory (./layouts is relative to the CWD) with
$NANORUN_LAYOUT_DIR cleared, so nothing is read from or left in the repository.
"""

from __future__ import annotations

import logging
import os
import types

import pytest
import torch
from tokens import assert_same_tokens

from nanorun import LLM, SamplingParams
from nanorun.cli import main
from nanorun.config import DEFAULT_MAX_BATCH_TOKENS, EngineConfig
from nanorun.device import device_spec
from nanorun.layout import (LAYOUT_DIR_ENV, Layout, find_tuned_layouts, overlap,
                            tuned_layout_path)
from nanorun.models import get_preset, layer_ops
from nanorun.search import Predictor, get_device
from nanorun.search.costmodel import CostModel
from nanorun.search.hardware import known_device

MODEL = "tiny-llama"
CPU = get_device("cpu")
PROMPTS = [[1, 2, 3, 4, 5] * 7, [9, 8, 7] * 20, [4] * 3]
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(LAYOUT_DIR_ENV, raising=False)
    return tmp_path


def _tune(*extra: str) -> None:
    assert main(["tune", MODEL, "--gpu", "cpu", "--trace", "const:64x16", "--trials", "4",
                 "--no-plot", "--no-progress", *extra]) == 0


def _store(batch_tokens: int, tp: int = 1, mtime: float | None = None) -> str:
    """An "overlap" layout stored where tune would put a tuned one; returns its file name."""
    ops = tuple(op.name for op in layer_ops(tp))
    path = tuned_layout_path(MODEL, "cpu", batch_tokens, tp)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlap(ops, batch_tokens, CPU).save(path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path.name


def _llm(**kw) -> LLM:
    return LLM(MODEL, layout="auto", weights="random", kv_cache_tokens=4096, **kw)


# -- tune, then auto ----------------------------------------------------------------------------
def test_auto_takes_what_tune_wrote_at_its_batch_size(workdir, caplog):
    _tune()
    (written,) = (workdir / "layouts").iterdir()
    tuned = Layout.load(written)
    assert written.name == f"{MODEL}.cpu.{tuned.batch_tokens}.json"
    with caplog.at_level(logging.WARNING, logger="nanorun"):
        llm = _llm()
    engine = llm.engine
    assert engine.config.max_batch_tokens == tuned.batch_tokens != DEFAULT_MAX_BATCH_TOKENS
    assert engine.scheduler.max_batch_tokens == tuned.batch_tokens
    assert engine.executor.layout_name == written.name
    assert engine.executor.layout.ops == tuned.ops
    assert f"using the tuned layout {written.name}" in caplog.text
    assert str(workdir) not in caplog.text
    reference = LLM(MODEL, layout="sequential", weights="random", kv_cache_tokens=4096,
                    max_batch_tokens=tuned.batch_tokens)
    want = reference.generate(PROMPTS, GREEDY)
    # The tuned layout's nano-batches cut the GEMMs otherwise: up to a near-tie (tests/tokens.py)
    for prompt, got, ref in zip(PROMPTS, llm.generate(PROMPTS, GREEDY), want, strict=True):
        assert_same_tokens(got.token_ids, ref.token_ids, prompt=prompt, params=GREEDY,
                           logits_of=reference.engine.prompt_logits)


def test_tune_writes_to_and_auto_reads_from_the_env_dir_first(workdir, monkeypatch):
    _store(64, mtime=2e9)                       # ./layouts, and the newer file
    env_dir = workdir / "mine"
    monkeypatch.setenv(LAYOUT_DIR_ENV, str(env_dir))
    _tune()
    (written,) = env_dir.iterdir()
    assert [p.name for p in (workdir / "layouts").iterdir()] == [f"{MODEL}.cpu.64.json"]
    assert _llm().engine.executor.layout_name == written.name
    # An exact size the env dir lacks is still found further down the search order.
    assert _llm(max_batch_tokens=64).engine.executor.layout_name == f"{MODEL}.cpu.64.json"


def test_out_overrides_where_tune_writes(workdir):
    _tune("--out", "elsewhere/x.json")
    assert (workdir / "elsewhere" / "x.json").is_file()
    assert not (workdir / "layouts").exists()


# -- which batch size ---------------------------------------------------------------------------
def test_without_max_batch_tokens_the_newest_tuned_layout_wins():
    old, new = _store(128, mtime=1e9), _store(64, mtime=2e9)
    engine = _llm().engine
    assert (engine.executor.layout_name, engine.config.max_batch_tokens) == (new, 64)
    _store(128, mtime=3e9)
    assert _llm().engine.executor.layout_name == old


def test_explicit_max_batch_tokens_takes_exactly_that_size():
    name = _store(64)
    _store(128)
    engine = _llm(max_batch_tokens=64).engine
    assert (engine.executor.layout_name, engine.config.max_batch_tokens) == (name, 64)


def test_explicit_max_batch_tokens_without_a_layout_falls_back_and_says_why(caplog):
    _store(64)
    _store(128)
    with caplog.at_level(logging.WARNING, logger="nanorun"):
        engine = _llm(max_batch_tokens=96).engine
    assert (engine.executor.layout_name, engine.config.max_batch_tokens) == ("overlap", 96)
    assert "max_batch_tokens=96" in caplog.text
    assert f"{MODEL}.cpu.BATCH.json exists for 64, 128 tokens" in caplog.text
    assert "Leave max_batch_tokens unset" in caplog.text


def test_nothing_tuned_runs_overlap_at_the_default_size_and_says_how_to_tune(caplog):
    with caplog.at_level(logging.WARNING, logger="nanorun"):
        engine = _llm().engine
    assert engine.executor.layout_name == "overlap"
    assert engine.config.max_batch_tokens == DEFAULT_MAX_BATCH_TOKENS
    assert f"nanorun tune {MODEL} --gpu cpu" in caplog.text


def test_a_layout_file_sets_the_batch_size_unless_the_user_does(workdir):
    path = workdir / "mine.json"
    overlap(tuple(op.name for op in layer_ops(1)), 48, CPU).save(path)
    assert LLM(MODEL, layout=str(path), weights="random").engine.config.max_batch_tokens == 48
    with pytest.raises(ValueError, match="max_batch_tokens is 64"):
        LLM(MODEL, layout=str(path), weights="random", max_batch_tokens=64)


def test_max_batch_tokens_none_means_left_to_the_layout():
    assert EngineConfig(MODEL).max_batch_tokens is None
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive int"):
        EngineConfig(MODEL, max_batch_tokens=0)


# -- tensor parallelism -------------------------------------------------------------------------
def test_tensor_parallel_layouts_are_stored_and_found_per_degree(workdir, caplog):
    _tune("--tp", "2")
    (written,) = (workdir / "layouts").iterdir()
    batch = Layout.load(written).batch_tokens
    assert written.name == f"{MODEL}.cpu.tp2.{batch}.json"
    assert find_tuned_layouts(MODEL, "cpu", tp=2) == {batch: written.relative_to(workdir)}
    assert find_tuned_layouts(MODEL, "cpu", tp=1) == {}
    tp2 = Predictor(CostModel(get_preset(MODEL), CPU, tp=2)).resolve("auto", batch)
    assert tp2.name == written.name
    assert {"attn_allreduce", "mlp_allreduce"} <= {op for op, _ in tp2.ops}
    with caplog.at_level(logging.WARNING, logger="nanorun"):
        assert _llm().engine.executor.layout_name == "overlap"   # tp 1 ignores the tp2 file
    assert f"no tuned layout {MODEL}.cpu.BATCH.json" in caplog.text


# -- device names -------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda_name, gpu", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A100 80GB PCIe", "a100"),
    ("NVIDIA L40S", "l40s"), ("h100", "h100"), ("H100-SXM", "h100"), ("a100_sxm", "a100"),
])
def test_cuda_device_names_map_to_the_gpu_names_tune_uses(cuda_name, gpu, monkeypatch):
    assert known_device(cuda_name).name == gpu
    assert get_device(cuda_name).name == gpu
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: cuda_name)
    sms = 114 if "PCIe" in cuda_name and gpu == "h100" else get_device(gpu).sm_count
    props = types.SimpleNamespace(multi_processor_count=sms, total_memory=80 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    spec = device_spec(torch.device("cuda"))
    assert spec.name == gpu and spec.sm_count == sms     # the device's own SM count


def test_an_unknown_gpu_name_is_not_mistaken_for_a_known_one():
    assert known_device("NVIDIA GeForce RTX 4090") is None
    with pytest.raises(ValueError, match="unknown device"):
        get_device("NVIDIA GeForce RTX 4090")
