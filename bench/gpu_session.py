"""The first GPU session in one call (issue 16): the stages, their caps, and what each writes.

    python bench/gpu_session.py [--rehearse] [STAGE ...]      (bench/gpu_session.sh calls it)

A session lent a GPU has 15 minutes of device time, a fresh machine's start included, and one
call runs at most 10 minutes: so everything runs in ONE call of at most BUDGET_S = 540 s, most
valuable first, each stage under its own cap (the caps add up to BUDGET_S, the build
included). A stage's steps run as subprocesses killed at the cap (their whole process group),
and the stage's file is written to $OUT as soon as the stage ends, however it ended: a call cut
short still returns every stage that finished. $OUT holds at most 8 files: env.json,
session.log (written by the shell script) and one <stage>.json per stage.

Every <stage>.json has the same fields, on the GPU and in the rehearsal:
    stage, status (ok | failed | timeout | skipped), cap_s, seconds, rehearsal, device,
    model, commit, date, steps [{step, status, exit, seconds, command}], results {...}
`results` is the stage's own (see each collect_* below); a field the CPU cannot measure (SMs,
green contexts) is null there, never left out.

--rehearse runs the same stages on the CPU with tiny-llama in about a minute, so the script's
logic, caps and packing are tested (tests/test_gpu_session.py) before any GPU sees them. It
builds nothing (the build would replace the extension others are using): its build step checks
that nanorun imports and records the command the GPU runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 540              # 9 minutes: a 10-minute call less a minute for slack and transfers
MAX_OUT_FILES = 8           # what the device tool returns from $OUT
GPU_TEST_TIMEOUT_S = 30     # one GPU test's cap (pytest-timeout), so no test eats the stage


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: int
    argv: tuple[str, ...]
    env: dict = field(default_factory=dict)
    instead_of: str | None = None   # runs only if that earlier step did not end "ok"


@dataclass(frozen=True)
class Stage:
    name: str
    cap_s: int              # the sum of its steps' caps; a step also stops at the stage's end
    what: str
    takes_rest: bool = False    # the last stage: every second the others left, at least cap_s


# Most valuable first. Caps in seconds; they sum to BUDGET_S (tests/test_gpu_session.py).
STAGES = (
    Stage("smoke", 190, "build for sm_90a (120 s; if it fails, the C++ core alone, 30 s), tune "
                        "the tiny model for this GPU on the CPU (10 s), then a 30-second smoke "
                        "test: tiny model, every layout, CUDA kernels, green contexts, events, "
                        "graphs, against the CPU's tokens and logits"),
    Stage("tests", 75, "the GPU-marked tests, each capped at 30 s"),
    Stage("device", 35, "GEMM rate, copy bandwidth, SMs, green-context granularity read back, "
                        "overlap partitions, graph replay vs eager"),
    Stage("serve", 150, "Llama-3-8B (random bf16) offline at const:1024x512 and on sharegpt "
                        "under sequential, overlap and the CPU-tuned layout, one process"),
    Stage("attention", 30, "decode attention 256 x 2048 on all SMs and on the attention "
                           "partition: GB/s against the copy bandwidth"),
    Stage("tune", 60, "nanorun profile, a re-tune with that profile and tune --measure 3, in "
                      "what the budget has left (at least 60 s)", takes_rest=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


@dataclass(frozen=True)
class Settings:
    """What differs between the GPU call and the CPU rehearsal; nothing else does."""

    rehearse: bool
    python: str
    out: Path
    work: Path
    gpu: str                # the device spec layouts are tuned for: h200, h100 (cpu: rehearsal)
    commit: str

    @property
    def device(self) -> str:
        return "cpu" if self.rehearse else "cuda"

    @property
    def model(self) -> str:
        return "tiny-llama" if self.rehearse else "llama-3-8b"


# -- the stages' steps -----------------------------------------------------------------------------
def steps_smoke(s: Settings) -> list[Step]:
    build = (s.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", ".")
    build_env = {"NANORUN_CUDA": "ON", "CMAKE_ARGS": "-DCMAKE_CUDA_ARCHITECTURES=90a",
                 "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 4)}
    # Without a build nothing of nanorun imports (its C++ core, and search/ and models/ come
    # through the editable install), so a failed CUDA build falls back to the core alone: the
    # later stages then run on the PyTorch paths and say so, rather than all failing.
    fallback = build
    fallback_env = {"NANORUN_CUDA": "OFF",
                    "CMAKE_BUILD_PARALLEL_LEVEL": build_env["CMAKE_BUILD_PARALLEL_LEVEL"]}
    if s.rehearse:   # never rebuild here: others import the extension from this tree
        build, build_env = (s.python, "-c", "import nanorun.cuda_ops as c; "
                            "print('nanorun imports; CUDA kernels built:', c.available())"), {}
        fallback, fallback_env = build, {}
    # Besides the two built-in layouts, one `nanorun tune` picks for the tiny model on this GPU's
    # spec (cost model only, seconds): partitions and splits neither built-in one has.
    tuned = str(s.work / f"tiny-llama.{s.gpu}.json")
    tune = (s.python, "-m", "nanorun.cli", "tune", "tiny-llama", "--gpu", s.gpu, "--trials", "30",
            "--max-batch-tokens", "64", "--out", tuned, "--no-plot", "--no-progress")
    return [Step("build", 120, build, build_env),
            Step("build-without-cuda", 30, fallback, fallback_env, instead_of="build"),
            Step("tune-tiny", 10, tune),
            Step("smoke", 30, (s.python, "bench/gpu_smoke.py", "--device", s.device, "--layouts",
                               "sequential", "overlap", tuned, "--out",
                               str(s.work / "smoke.json")))]


def steps_tests(s: Settings) -> list[Step]:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text(encoding="utf-8"))
    argv = [s.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
            "-p", "gpu_pytest_report"]
    if _has_module(s.python, "pytest_timeout"):
        argv += ["--timeout", str(GPU_TEST_TIMEOUT_S)]
    env = {"PYTHONPATH": _pythonpath("bench"), "NANORUN_TEST_REPORT": str(s.work / "tests.jsonl")}
    return [Step("gpu-tests", 75, (*argv, *files), env)]


def steps_device(s: Settings) -> list[Step]:
    argv = [s.python, "bench/gpu_device.py", "--out", str(s.work / "device.json")]
    if s.rehearse:
        argv += ["--rehearse", "--model", s.model, "--batch-tokens", "64"]
    return [Step("device", 35, tuple(argv))]


def steps_serve(s: Settings) -> list[Step]:
    steps = []
    tuned = _tuned_layouts(s)
    if not tuned:   # not prepared here: tune on this machine's CPU (cost model only, seconds)
        tuned = [str(s.work / f"{s.model}.{s.gpu}.cpu-tuned.json")]
        steps.append(Step("tune-on-cpu", 30, (s.python, "-m", "nanorun.cli", "tune", s.model,
                                              "--gpu", s.gpu, "--out", tuned[0], "--no-plot",
                                              "--no-progress", *_rehearsal_tune(s))))
    workloads = ("const:32x8", "sharegpt") if s.rehearse else ("const:1024x512", "sharegpt")
    requests = ("4", "4") if s.rehearse else ("64", "200")
    argv = [s.python, "bench/gpu_serve.py", s.model, "--device", s.device,
            "--layouts", "sequential", "overlap", *tuned, "--workloads", *workloads,
            "--num-requests", *requests, "--out", str(s.work / "serve.json")]
    if s.rehearse:      # short requests: the rehearsal checks the plumbing, not the speed
        argv += ["--max-batch-tokens", "64", "--filter", "64,16,80"]
    steps.append(Step("serve", 150 - sum(st.cap_s for st in steps), tuple(argv)))
    return steps


def steps_attention(s: Settings) -> list[Step]:
    return [Step("attention", 30, (s.python, "bench/gpu_attention.py", "--device", s.device,
                                   "--out", str(s.work / "attention.json")))]


def steps_tune(s: Settings) -> list[Step]:
    profile, layout = s.work / "profile.json", s.work / "tuned.json"
    # The rehearsal checks the steps' plumbing: the smallest profile and one measured candidate.
    small = ("--tokens", "16,64", "--context", "128") if s.rehearse else ()
    measure = "1" if s.rehearse else "3"
    return [Step("profile", 30, (s.python, "-m", "nanorun.cli", "profile", s.model, "--device",
                                 s.device, "--gpu", s.gpu, *small, "--out", str(profile))),
            Step("tune-measure", 30, (s.python, "-m", "nanorun.cli", "tune", s.model, "--gpu",
                                      s.gpu, "--profile", str(profile), "--measure", measure,
                                      "--device", s.device, "--out", str(layout), "--no-plot",
                                      "--no-progress", *_rehearsal_tune(s)))]


def _rehearsal_tune(s: Settings) -> tuple[str, ...]:
    return ("--trials", "10", "--max-batch-tokens", "64") if s.rehearse else ()


def _tuned_layouts(s: Settings) -> list[str]:
    """The layout `nanorun tune` picked on the CPU for this GPU, if `prepare` made one."""
    path = REPO / ".whl" / "layouts" / f"{s.model}.{s.gpu}.json"
    return [str(path.relative_to(REPO))] if path.is_file() else []


# -- what each stage's file holds ------------------------------------------------------------------
def collect_smoke(s: Settings) -> dict:
    return {"smoke": _read_json(s.work / "smoke.json")}


def collect_tests(s: Settings) -> dict:
    reports = [json.loads(line) for line in _read_text(s.work / "tests.jsonl").splitlines()
               if line.strip()]
    counts: dict[str, int] = {}
    for r in reports:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return {"counts": counts,
            "failures": [{"test": r["nodeid"], "message": r["message"]} for r in reports
                         if r["outcome"] in ("failed", "error")],
            "slowest": sorted(({"test": r["nodeid"], "seconds": r["seconds"]} for r in reports
                               if r["outcome"] != "skipped"), key=lambda r: -r["seconds"])[:10],
            "gpu_facts": [line for r in reports for line in r["facts"]]}


def collect_device(s: Settings) -> dict:
    return {"device": _read_json(s.work / "device.json")}


def collect_serve(s: Settings) -> dict:
    return {"serve": _read_json(s.work / "serve.json")}


def collect_attention(s: Settings) -> dict:
    return {"attention": _read_json(s.work / "attention.json")}


def collect_tune(s: Settings) -> dict:
    return {"profile": _read_json(s.work / "profile.json"),
            "layout": _read_json(s.work / "tuned.json")}


STEPS: dict[str, Callable[[Settings], list[Step]]] = {
    "smoke": steps_smoke, "tests": steps_tests, "device": steps_device, "serve": steps_serve,
    "attention": steps_attention, "tune": steps_tune}
COLLECT: dict[str, Callable[[Settings], dict]] = {
    "smoke": collect_smoke, "tests": collect_tests, "device": collect_device,
    "serve": collect_serve, "attention": collect_attention, "tune": collect_tune}


# -- running -----------------------------------------------------------------------------------------
def run_step(step: Step, seconds: float) -> tuple[str, int | None]:
    """Run a step for at most `seconds`; (ok | failed | timeout, exit status)."""
    env = {**os.environ, **step.env}
    say(f"{step.name}: {shlex.join(step.argv)} (cap {seconds:.0f} s)")
    # A session of its own, so a timeout kills the step's children too (pip's compilers,
    # torch's workers), not only the process it started.
    proc = subprocess.Popen(step.argv, cwd=REPO, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(seconds, 0.1))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return "timeout", None
    return ("ok" if rc == 0 else "failed"), rc


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage: Stage, s: Settings, deadline: float) -> dict:
    """Run the stage's steps under its cap and the session's deadline; write <stage>.json."""
    start = time.monotonic()
    stage_end = deadline if stage.takes_rest else min(start + stage.cap_s, deadline)
    steps, status = [], "ok"
    say(f"stage {stage.name} (cap {stage.cap_s} s, {deadline - start:.0f} s left): {stage.what}")
    planned = STEPS[stage.name](s)
    for k, step in enumerate(planned):
        if step.instead_of and any(r["step"] == step.instead_of and r["status"] == "ok"
                                   for r in steps):
            continue
        left = min(step.cap_s, stage_end - time.monotonic())
        if stage.takes_rest:    # the steps share what is left in proportion to their caps
            rest = sum(x.cap_s for x in planned[k:] if not x.instead_of)
            left = (stage_end - time.monotonic()) * step.cap_s / rest
        t0 = time.monotonic()
        if left < 1:
            outcome, rc = "skipped", None
            say(f"{step.name}: skipped, no time left in the stage or the session")
        else:
            outcome, rc = run_step(step, left)
        steps.append({"step": step.name, "status": outcome, "exit": rc,
                      "seconds": round(time.monotonic() - t0, 1), "cap_s": step.cap_s,
                      "command": shlex.join(_portable(step.argv))})
        if outcome != "ok" and status == "ok":
            status = outcome
    try:
        results = COLLECT[stage.name](s)
    except Exception as e:  # a malformed partial file is a result to record, not a crash
        results = {"error": f"collecting results failed: {type(e).__name__}: {e}"}
        status = "failed" if status == "ok" else status
    record = {"stage": stage.name, "status": status, "cap_s": stage.cap_s,
              "seconds": round(time.monotonic() - start, 1), "rehearsal": s.rehearse,
              "device": s.device, "model": s.model, "gpu": s.gpu, "commit": s.commit,
              "date": _now(), "what": stage.what, "steps": steps, "results": results}
    write_json(s.out / f"{stage.name}.json", record)
    say(f"stage {stage.name}: {status} in {record['seconds']} s -> {stage.name}.json")
    return record


def skipped_stage(stage: Stage, s: Settings, why: str) -> dict:
    record = {"stage": stage.name, "status": "skipped", "cap_s": stage.cap_s, "seconds": 0.0,
              "rehearsal": s.rehearse, "device": s.device, "model": s.model, "gpu": s.gpu,
              "commit": s.commit, "date": _now(), "what": stage.what, "steps": [],
              "results": {"skipped": why}}
    write_json(s.out / f"{stage.name}.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stages", nargs="*", help=f"default: all, in order ({' '.join(STAGE_NAMES)})")
    p.add_argument("--rehearse", action="store_true", help="the CPU rehearsal")
    p.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", BUDGET_S)),
                   help=f"seconds for the whole call (default {BUDGET_S})")
    args = p.parse_args(argv)
    unknown = [x for x in args.stages if x not in STAGE_NAMES]
    if unknown:
        print(f"unknown stage {unknown[0]!r}; stages: {' '.join(STAGE_NAMES)}", file=sys.stderr)
        return 2
    if not args.rehearse and not _run_text(["nvidia-smi", "-L"]):
        # The GPU call rebuilds the extension in place: never on a machine without a GPU,
        # where others may be importing it.
        print("no GPU visible (nvidia-smi lists none): this is the GPU call; on a CPU run "
              "bash bench/gpu_session.sh --rehearse", file=sys.stderr)
        return 2
    chosen = [st for st in STAGES if not args.stages or st.name in args.stages]
    out = Path(os.environ.get("OUT") or REPO / "out")
    work = Path(os.environ.get("NANORUN_GPU_WORK", "/tmp/nanorun-gpu"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    s = Settings(args.rehearse, os.environ.get("PYTHON", sys.executable), out, work,
                 "cpu" if args.rehearse else gpu_slug(), commit())
    write_json(out / "env.json", environment(s))
    # The budget counts from here: the facts above take a few seconds, inside the minute the
    # 540 s leave of the call's 600.
    deadline = time.monotonic() + args.budget
    say(f"stages {' '.join(st.name for st in chosen)}; budget {args.budget:.0f} s; "
        f"{'REHEARSAL on the CPU' if s.rehearse else 'GPU'}; model {s.model}; spec {s.gpu}")
    records = []
    for stage in chosen:
        if time.monotonic() > deadline - 1:
            records.append(skipped_stage(stage, s, "the session's budget was spent"))
            continue
        records.append(run_stage(stage, s, deadline))
    print("\nstage       status    seconds  cap")
    for r in records:
        print(f"{r['stage']:<11} {r['status']:<9} {r['seconds']:>7.1f}  {r['cap_s']:>3}")
    files = sorted(os.listdir(out))
    print(f"{len(files)} files in $OUT: {' '.join(files)}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


# -- facts and helpers -----------------------------------------------------------------------------
def environment(s: Settings) -> dict:
    code = ("import json, torch, platform; p = torch.cuda.get_device_properties(0) "
            "if torch.cuda.is_available() else None; print(json.dumps({'torch': "
            "torch.__version__, 'torch_cuda': torch.version.cuda, 'gpu': p and p.name, "
            "'sms': p and p.multi_processor_count}))")
    facts = _run_json([s.python, "-c", code])
    smi = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                     "--format=csv,noheader"])
    return {"date": _now(), "commit": s.commit, "rehearsal": s.rehearse, "device": s.device,
            "gpu_spec": s.gpu, "model": s.model, "budget_s": BUDGET_S,
            "stages": {st.name: st.cap_s for st in STAGES},
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "nvidia_smi": smi, "nvcc": _nvcc_version(), **facts,
            "packages": {n: _version(n) for n in ("cuda-bindings", "cupy-cuda13x", "optuna",
                                                  "triton", "numpy", "pytest",
                                                  "pytest-timeout")}}


def gpu_slug() -> str:
    """h200, h100, ... from nvidia-smi; GPU=... overrides."""
    if os.environ.get("GPU"):
        return os.environ["GPU"]
    name = _run_text(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) or ""
    match = re.search(r"\b([a-z]+\d+[a-z]*)\b", name.lower().replace("nvidia", ""))
    return match.group(1) if match else "h200"


def commit() -> str:
    """The commit measured: $NANORUN_COMMIT, .whl/COMMIT (the device's tree has no .git), git."""
    if os.environ.get("NANORUN_COMMIT"):
        return os.environ["NANORUN_COMMIT"]
    stamp = REPO / ".whl" / "COMMIT"
    if stamp.is_file() and stamp.read_text().strip():
        return stamp.read_text().strip()
    sha = _run_text(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    if not sha:
        return "unknown"
    dirty = _run_text(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return sha + ("-dirty" if dirty else "")


def write_json(path: Path, data) -> None:
    """Whole or not at all: a call cut off mid-write leaves the previous file, never half."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def say(text: str) -> None:
    print(f"[gpu_session {datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {text}",
          flush=True)


def _portable(argv) -> list[str]:
    """A command as a report records it: paths of the scratch folder and the repo cut off."""
    out = []
    for a in argv:
        a = a.replace(str(REPO) + "/", "")
        out.append(re.sub(r"^/.*/", "", a) if a.startswith("/") else a)
    return out


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _run_text(argv: list[str]) -> str | None:
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def _run_json(argv: list[str]) -> dict:
    text = _run_text(argv)
    try:
        return json.loads(text.splitlines()[-1]) if text else {}
    except json.JSONDecodeError:
        return {}


def _nvcc_version() -> str | None:
    text = _run_text(["nvcc", "--version"]) or _run_text(["/usr/local/cuda/bin/nvcc",
                                                          "--version"])
    return text.splitlines()[-1] if text else None


def _version(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _has_module(python: str, name: str) -> bool:
    return _run_text([python, "-c", f"import {name}"]) is not None


def _pythonpath(*extra: str) -> str:
    return os.pathsep.join([*(str(REPO / e) for e in extra),
                            *filter(None, [os.environ.get("PYTHONPATH")])])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
