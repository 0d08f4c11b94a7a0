"""The GPU session's scripts, where no GPU is needed: bench/gpu_session.sh plans every stage
(DRY_RUN) within what the device tool returns, bench/gpu_device.py refuses a machine without
CUDA with a message rather than a traceback, and bench/latency_curve.py takes its peak only from
a report of the same workload. What they measure on a GPU is checked nowhere but there."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_session.sh"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _session(*stages: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "GPU": "h100", "OUT": str(tmp_path / "out"),
           "NANORUN_GPU_WORK": str(tmp_path / "work"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *stages], capture_output=True, text=True,
                          env=env, timeout=300)


def _steps(tarball: Path) -> list[dict]:
    with tarfile.open(tarball) as tar:
        names = [m for m in tar.getnames() if m.endswith(".steps.jsonl")]
        return [json.loads(line) for name in names
                for line in tar.extractfile(name).read().decode().splitlines()]


def test_the_session_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_an_unknown_stage_is_refused_with_the_list_of_stages(tmp_path):
    run = _session("bench", tmp_path=tmp_path)
    assert run.returncode == 2
    assert "unknown stage 'bench'" in run.stderr and "profile-tune" in run.stderr


def test_a_dry_run_of_all_plans_every_stage_in_what_the_device_tool_returns(tmp_path):
    tuned = tmp_path / "llama-3-8b.h100.json"
    tuned.write_text(json.dumps({"version": 1, "name": "tuned", "batch_tokens": 2048}))
    run = _session("all", tmp_path=tmp_path, TUNED_LAYOUT=str(tuned), NUM_REQUESTS="50")
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    # The device tool returns at most 8 files, named in letters, digits, '.', '_' and '-'.
    assert len(files) <= 8 and all(re.fullmatch(r"[\w.-]+", f) for f in files), files
    assert {"env.json", "session.log"} <= set(files)
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["commit"]

    steps = {s["step"]: s for f in files if f.endswith(".tar.gz") for s in _steps(out / f)}
    assert set(steps) == {"gpu-tests", "gpu-device", "kernels", "profile", "tune", "calibration",
                          "bench-azure-conv", "bench-sharegpt", "bench-lmsys",
                          "bench-const-1024x512", "bench-azure-code", "latency-curve",
                          "test-suite"}
    assert all(s["status"] == "dry-run" for s in steps.values())
    assert "--measure 5 --device cuda" in steps["tune"]["command"]
    # Every layout of one bench runs at the tuned layout's dense batch, the tuned one included.
    bench = steps["bench-sharegpt"]["command"]
    assert "--max-batch-tokens 2048" in bench and "--num-requests 50" in bench
    assert f"--layout overlap {tuned}" in bench
    assert f"--layout {tuned}" in steps["latency-curve"]["command"]
    assert "-m gpu" in steps["gpu-tests"]["command"]


def test_steps_that_do_not_fit_the_budget_are_skipped_and_recorded(tmp_path):
    run = _session("kernels", tmp_path=tmp_path, BUDGET_S="30")
    assert run.returncode == 0, run.stdout + run.stderr
    [step] = _steps(tmp_path / "out" / "kernels.tar.gz")
    assert step["step"] == "kernels" and step["status"] == "skipped"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_the_device_report_needs_cuda_and_says_so(tmp_path):
    out = tmp_path / "device.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_device.py"), "--out",
                          str(out)], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 2
    assert "needs a CUDA device" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


def _report(**header) -> dict:
    head = {"model": "llama-3-8b", "max_batch_tokens": 1024, "seed": 0, "device_type": "cuda",
            "length_filter": None, "trace": "sharegpt", "num_requests": 198, "num_skipped": 2}
    head.update(header)
    run = {"request_rate": "inf", "completed": 198, "failed": 0, "request_throughput": 12.5,
           "total_token_throughput": 6000.0, "nanorun": {"layout": "sequential"}}
    return {"nanorun": head, "runs": [run]}


def test_the_latency_curve_takes_its_peak_only_from_the_same_workload(tmp_path):
    curve = _bench_module("latency_curve")
    config = curve.BenchConfig(model="llama-3-8b", device="cuda", max_batch_tokens=1024,
                               trace="sharegpt", num_requests=200, length_filter=None)
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(_report()))
    peak = curve.peak_from_report(path, config)
    assert peak["request_throughput"] == 12.5 and "sharegpt.json" in peak["source"]
    for differs in ({"max_batch_tokens": 2048}, {"trace": "lmsys"}, {"num_requests": 100},
                    {"device_type": "cpu"}):
        path.write_text(json.dumps(_report(**differs)))
        assert curve.peak_from_report(path, config) is None, differs
