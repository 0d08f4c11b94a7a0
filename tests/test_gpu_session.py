"""The GPU session's scripts, where no GPU is needed: bench/gpu_session.sh's stages fit the
one 9-minute call (caps in the script, the docs and the code agree), its CPU rehearsal runs
every stage and writes the files the GPU call would, with their fields, within the 8 files the
device tool returns, a stage cut short still writes its file, the unpacker keeps rehearsal
figures out of a GPU's folder, its device step refuses a machine without CUDA with a
message rather than a traceback, and bench/latency_curve.py takes its peak only from a report
of the same workload. What they measure on a GPU is checked nowhere but there."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_session.sh"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module      # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _session(*args: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "NANORUN_GPU_WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_the_session_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_an_unknown_stage_is_refused_with_the_list_of_stages(tmp_path):
    run = _session("bench", "--rehearse", tmp_path=tmp_path)
    assert run.returncode == 2
    assert "unknown stage 'bench'" in run.stdout + run.stderr and "attention" in run.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the refusal "
                    "without a GPU")
def test_the_gpu_call_refuses_a_machine_without_a_gpu(tmp_path):
    """It would rebuild the extension in place, under everyone importing it."""
    run = _session("device", tmp_path=tmp_path)
    assert run.returncode == 2 and "--rehearse" in run.stdout
    assert not (tmp_path / "out" / "device.json").exists()


def test_the_caps_add_up_to_the_nine_minute_call_with_the_build_in_the_first():
    session = _bench_module("gpu_session")
    assert sum(st.cap_s for st in session.STAGES) <= 9 * 60 == session.BUDGET_S
    assert [st.name for st in session.STAGES] == ["smoke", "tests", "device", "serve",
                                                  "attention", "tune"]
    settings = session.Settings(rehearse=False, python="python3", out=Path("/o"),
                                work=Path("/w"), gpu="h200", commit="c")
    for st in session.STAGES:     # a stage's steps fit its cap, on the GPU as in the rehearsal
        for rehearse in (False, True):
            steps = session.STEPS[st.name](dataclasses.replace(settings, rehearse=rehearse))
            # A fallback runs only in the time of the step it replaces, which failed.
            assert sum(step.cap_s for step in steps if not step.instead_of) <= st.cap_s
            for step in steps:
                if step.instead_of:
                    other = next(x for x in steps if x.name == step.instead_of)
                    assert step.cap_s + sum(x.cap_s for x in steps if x is not other
                                            and not x.instead_of) <= st.cap_s + other.cap_s
    build, fallback, *_ = session.steps_smoke(settings)
    assert build.name == "build" and "CMAKE_CUDA_ARCHITECTURES=90a" in build.env["CMAKE_ARGS"]
    assert fallback.instead_of == "build" and fallback.env["NANORUN_CUDA"] == "OFF"
    # What the GPU call runs: the 8B model, the workloads, the top 3 measured.
    serve = " ".join(session.steps_serve(settings)[-1].argv)
    assert "gpu_session.py step serve llama-3-8b --device cuda --layouts sequential overlap " \
        in serve
    assert "--workloads const:1024x512 sharegpt --num-requests 64 200" in serve
    tune = " ".join(session.steps_tune(settings)[-1].argv)
    assert "--measure 3 --device cuda" in tune and "--profile" in tune
    assert session.STAGES[-1].takes_rest and not any(st.takes_rest for st in session.STAGES[:-1])
    # The stage caps and the budget the script's header and the docs state are these.
    header = SCRIPT.read_text()
    doc = (REPO / "docs" / "gpu_session.md").read_text()
    for st in session.STAGES:
        assert re.search(rf"#\s+{st.name}\s+{st.cap_s}\b", header), st.name
        assert re.search(rf"\|\s*`?{st.name}`?\s*\|\s*{st.cap_s}\s*\|", doc), st.name
    assert "540" in header and "540" in doc


# What every stage's file holds, and what each stage's results must at least say.
STAGE_FIELDS = {"stage", "status", "cap_s", "seconds", "rehearsal", "device", "model", "gpu",
                "commit", "date", "what", "steps", "results"}
RESULT_FIELDS = {
    "smoke": lambda r: r["smoke"]["layouts"] and all(
        {"prompt_logits_max_rel_diff_vs_cpu", "graphs_active", "green_contexts", "partitions",
         "tokens_agreeing_with_cpu", "ok"} <= set(x) for x in r["smoke"]["layouts"].values()),
    "tests": lambda r: {"counts", "failures", "slowest", "gpu_facts"} <= set(r)
                       and sum(r["counts"].values()) > 100,
    "device": lambda r: {"device", "ceilings", "green_contexts", "overlap_partitions",
                         "graph_replay", "ok"} <= set(r["device"])
                        and r["device"]["ceilings"]["gemm_tflops"] > 0,
    "serve": lambda r: {"sequential", "overlap"} <= set(r["serve"]["summary"]["sharegpt"])
                       and len(r["serve"]["summary"]) == 2 and all(
        {"total_token_throughput", "percent_of_optimal", "throughput_ratio_to_sequential"}
        <= set(f) for w in r["serve"]["summary"].values() for f in w.values()),
    "attention": lambda r: all({"case", "gb_per_s", "share_of_copy_bandwidth", "cta_budget"}
                               <= set(c) for c in r["attention"]["cases"]),
    "tune": lambda r: r["profile"] is not None and r["layout"]["batch_tokens"] > 0,
}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """`bash bench/gpu_session.sh --rehearse`: every stage on the CPU with tiny-llama."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    run = _session("--rehearse", tmp_path=tmp)
    return run, tmp / "out"


@pytest.mark.slow
def test_the_rehearsal_writes_every_stage_file_within_what_the_tool_returns(rehearsal):
    run, out = rehearsal
    assert run.returncode in (0, 1), run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    # The device tool returns at most 8 files, named in letters, digits, '.', '_' and '-'.
    assert len(files) <= 8 and all(re.fullmatch(r"[\w.-]+", f) for f in files), files
    assert set(files) == {"env.json", "session.log", *(f"{s}.json" for s in RESULT_FIELDS)}
    env = json.loads((out / "env.json").read_text())
    assert env["rehearsal"] is True and env["torch"] == torch.__version__ and env["commit"]
    log = (out / "session.log").read_text()
    for name, has_fields in RESULT_FIELDS.items():
        record = json.loads((out / f"{name}.json").read_text())
        assert set(record) == STAGE_FIELDS, name
        assert record["rehearsal"] and record["device"] == "cpu" and record["steps"], name
        # Nothing is skipped in a rehearsal with the whole budget, and no path of this
        # machine goes into a command that a results file records.
        assert all(step["status"] != "skipped" for step in record["steps"]), record["steps"]
        assert not any(str(out.parent) in step["command"] for step in record["steps"])
        assert f"stage {name}" in log
        if record["status"] == "ok":
            assert has_fields(record["results"]), (name, record["results"])
    statuses = {n: json.loads((out / f"{n}.json").read_text())["status"] for n in RESULT_FIELDS}
    # CI machines are shared and a CPU is no GPU: a stage may reach its GPU-sized cap here
    # (its file then says "timeout" and holds what finished), but none may fail, and the
    # quick ones must finish.
    assert set(statuses.values()) <= {"ok", "timeout"}, statuses
    assert statuses["device"] == statuses["tests"] == "ok", statuses


@pytest.mark.slow
def test_the_rehearsal_unpacks_only_when_asked_and_names_the_readme_figures(rehearsal, tmp_path):
    _, out = rehearsal
    unpack = [sys.executable, str(REPO / "bench" / "gpu_session.py"), "unpack", str(out),
              str(tmp_path)]
    refused = subprocess.run(unpack, capture_output=True, text=True)
    assert refused.returncode == 2 and "rehearsal" in refused.stderr
    done = subprocess.run([*unpack, "--rehearsal"], capture_output=True, text=True, check=True)
    assert (tmp_path / "traces" / "sharegpt.json").is_file()
    assert (tmp_path / "session" / "serve.json").is_file() and (tmp_path / "device.json").is_file()
    assert "sharegpt" in done.stdout and "% of optimal" in done.stdout


def test_a_stage_cut_short_still_writes_its_file(tmp_path):
    """The budget runs out inside the device stage: its step is killed, the file says so."""
    run = _session("--rehearse", "device", "attention", tmp_path=tmp_path, BUDGET_S="2")
    out = tmp_path / "out"
    device = json.loads((out / "device.json").read_text())
    assert device["status"] == "timeout" and device["steps"][0]["status"] == "timeout"
    assert device["steps"][0]["seconds"] < 30
    attention = json.loads((out / "attention.json").read_text())
    assert attention["status"] == "skipped" and set(attention) == STAGE_FIELDS
    assert run.returncode == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_the_device_report_needs_cuda_and_says_so(tmp_path):
    out = tmp_path / "device.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_session.py"), "step",
                          "device", "--out",
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
    config = curve.BenchConfig(model="llama-3-8b", engine_options={"device": "cuda"},
                               max_batch_tokens=1024,
                               trace="sharegpt", num_requests=200, length_filter=None)
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(_report()))
    peak = curve.peak_from_report(path, config)
    assert peak["request_throughput"] == 12.5 and "sharegpt.json" in peak["source"]
    for differs in ({"max_batch_tokens": 2048}, {"trace": "lmsys"}, {"num_requests": 100},
                    {"device_type": "cpu"}):
        path.write_text(json.dumps(_report(**differs)))
        assert curve.peak_from_report(path, config) is None, differs
