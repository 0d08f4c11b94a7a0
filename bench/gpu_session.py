"""The GPU session in one call (issues 16, 26): its stages, their caps, what each measures and
writes, and the unpacker of what comes back: one module.

    python bench/gpu_session.py [--rehearse] [STAGE ...]   the session (bench/gpu_session.sh
                                                           calls it, docs/gpu_session.md)
    python bench/gpu_session.py step NAME [ARGS]           one stage's measuring step: smoke,
                                                           device, serve, attention
    python bench/gpu_session.py unpack FILES_AT bench/results/GPU [--rehearsal]

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

The module reads top-down as the session runs: the stages and their steps, what each stage's
file holds, running them, the measuring steps (step_smoke, step_device, step_serve,
step_attention: each runs in its own process, so a cap can kill it), the tests stage's pytest
plugin (this module, loaded with `-p gpu_session`), and the unpacker.

--rehearse runs the same stages on the CPU with tiny-llama in about a minute, so the script's
logic, caps and packing are tested (tests/test_gpu_session.py) before any GPU sees them. It
builds nothing (the build would replace the extension others are using): its build step checks
that nanorun imports and records the command the GPU runs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

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
            Step("smoke", 30, (*_this_step(s, "smoke"), "--device", s.device, "--layouts",
                               "sequential", "overlap", tuned, "--out",
                               str(s.work / "smoke.json")))]


def steps_tests(s: Settings) -> list[Step]:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text(encoding="utf-8"))
    argv = [s.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
            "-p", "gpu_session"]
    if _has_module(s.python, "pytest_timeout"):
        argv += ["--timeout", str(GPU_TEST_TIMEOUT_S)]
    env = {"PYTHONPATH": _pythonpath("bench"), "NANORUN_TEST_REPORT": str(s.work / "tests.jsonl")}
    return [Step("gpu-tests", 75, (*argv, *files), env)]


def steps_device(s: Settings) -> list[Step]:
    argv = [*_this_step(s, "device"), "--out", str(s.work / "device.json")]
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
    argv = [*_this_step(s, "serve"), s.model, "--device", s.device,
            "--layouts", "sequential", "overlap", *tuned, "--workloads", *workloads,
            "--num-requests", *requests, "--out", str(s.work / "serve.json")]
    if s.rehearse:      # short requests: the rehearsal checks the plumbing, not the speed
        argv += ["--max-batch-tokens", "64", "--filter", "64,16,80"]
    steps.append(Step("serve", 150 - sum(st.cap_s for st in steps), tuple(argv)))
    return steps


def steps_attention(s: Settings) -> list[Step]:
    return [Step("attention", 30, (*_this_step(s, "attention"), "--device", s.device,
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


def _this_step(s: Settings, name: str) -> tuple[str, ...]:
    """The command of one of this module's measuring steps, run in a process of its own."""
    return (s.python, "bench/gpu_session.py", "step", name)


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


# -- running ---------------------------------------------------------------------------------
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
    """The session, one stage's step (`step NAME ...`) or the unpacker (`unpack ...`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["step"]:
        if len(argv) < 2 or argv[1] not in MEASURE:
            print(f"step: give one of {' '.join(MEASURE)}", file=sys.stderr)
            return 2
        return MEASURE[argv[1]](argv[2:])
    if argv[:1] == ["unpack"]:
        return unpack(argv[1:])
    return session(argv)


def session(argv: list[str]) -> int:
    """Every chosen stage in turn under the budget; the stage files in $OUT."""
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


# -- step: smoke ---------------------------------------------------------------------------------
SMOKE_TOLERANCE = 2e-2     # max |device - cpu| / max |cpu| over the prompt logits
SMOKE_MODEL = "tiny-llama"
SMOKE_PROMPT_LENS = (90, 7, 33)     # one longer than the dense batch: chunked prefill
SMOKE_MAX_TOKENS = 6


def step_smoke(argv: list[str]) -> int:
    """tiny-llama under every layout on the device, against the same model on the CPU in
    float32 (the smoke stage's check, about 30 s).

    On CUDA each engine runs float16 (the dtype the CUDA attention kernel runs under graph
    capture), so one pass goes through the CUDA kernels, the partitions' streams (green
    contexts where the driver allows), their events and the CUDA graphs; the executor's own
    report says which of those it used. Per layout: every request produced its tokens; the
    prompt logits are within float16 rounding of the CPU's (SMOKE_TOLERANCE). Greedy tokens
    are compared with the CPU's and reported (how many agree before the first difference),
    not required to match: a random model's near-ties can flip under float16 rounding. With
    --device cpu (the rehearsal) both sides are the CPU in float32. Exit status 0 when every
    check passed, 1 otherwise."""
    import torch

    p = argparse.ArgumentParser(prog="gpu_session.py step smoke")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layouts", nargs="+", default=["sequential", "overlap"])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from nanorun import Engine, SamplingParams

    if args.device == "cuda" and not torch.cuda.is_available():
        print("the smoke step with --device cuda needs a CUDA device", file=sys.stderr)
        return 2
    dtype = "float16" if args.device == "cuda" else "float32"
    kw = dict(max_batch_tokens=64, kv_cache_tokens=8192, weights="random", seed=0)
    g = torch.Generator().manual_seed(0)
    cpu = Engine(SMOKE_MODEL, device="cpu", dtype="float32", layout="sequential", **kw)
    vocab = cpu.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in SMOKE_PROMPT_LENS]
    params = SamplingParams(max_tokens=SMOKE_MAX_TOKENS, temperature=0.0, ignore_eos=True)
    want_tokens = generate(cpu, prompts, params)
    want_logits = cpu.prompt_logits(prompts[1])
    del cpu

    layouts = {}
    for layout in args.layouts:
        t0 = time.perf_counter()
        try:
            layouts[layout_name(layout)] = check_layout(Engine, layout, args.device, dtype, kw,
                                                        prompts, params, want_tokens,
                                                        want_logits)
        except Exception as e:  # one layout's failure is a fact; the others still run
            layouts[layout_name(layout)] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        layouts[layout_name(layout)]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"[smoke] {layout_name(layout)}: {json.dumps(layouts[layout_name(layout)])}",
              flush=True)
        # After each layout: a cap cuts off only the rest.
        report = write_smoke(args, dtype, layouts)
    print("smoke: all layouts passed" if report["ok"] else "smoke: FAILED")
    return 0 if report["ok"] else 1


def write_smoke(args, dtype: str, layouts: dict) -> dict:
    """The smoke report so far, written to --out."""
    from nanorun import cuda_ops
    report = {"model": SMOKE_MODEL, "device": args.device, "dtype": dtype,
              "tolerance": SMOKE_TOLERANCE, "cuda_kernels_built": cuda_ops.available(),
              "layouts_asked": args.layouts, "prompts": list(SMOKE_PROMPT_LENS),
              "max_tokens": SMOKE_MAX_TOKENS, "layouts": layouts,
              "ok": len(layouts) == len(args.layouts) and all(r["ok"] for r in layouts.values())}
    if args.out:
        from nanorun.benchmark.environment import write_result
        report = write_result(report, args.out, device=args.device)
    return report


def check_layout(engine_cls, layout, device, dtype, kw, prompts, params, want_tokens,
                 want_logits) -> dict:
    """One layout's smoke check on the device (step_smoke)."""
    engine = engine_cls(SMOKE_MODEL, device=device, dtype=dtype, layout=layout, **kw)
    ex = engine.executor
    tokens = generate(engine, prompts, params)
    replayed = generate(engine, prompts, params)   # the same sizes again: graph replays
    logits = engine.prompt_logits(prompts[1]).float().cpu()
    rel = float((logits - want_logits).abs().max() / want_logits.abs().max())
    agree = [_common_prefix(tokens[k], want_tokens[k]) for k in want_tokens]
    complete = (all(len(t) == SMOKE_MAX_TOKENS for t in tokens.values())
                and len(tokens) == len(prompts))
    streams = ex.streams
    return {
        "layout": ex.layout_name, "partitions": ex.partition_sms,
        "streams": getattr(streams, "how", None) if streams is not None else "none (CPU path)",
        "green_contexts": bool(getattr(streams, "green", False)),
        "graphs_active": ex.graphs_active,
        "graph_sizes_captured": sorted(ex.graphs.graphs) if ex.graphs is not None else [],
        "graphs_failure": ex.graphs.failure if ex.graphs is not None else None,
        "kernels": _kernel_names(engine),
        "prompt_logits_max_rel_diff_vs_cpu": rel,
        "tokens_agreeing_with_cpu": sum(agree), "tokens_total": SMOKE_MAX_TOKENS * len(prompts),
        "replay_tokens_equal_first_pass": replayed == tokens,
        "ok": bool(complete and rel <= SMOKE_TOLERANCE and replayed == tokens),
    }


def layout_name(layout: str) -> str:
    """A layout as the files name it: a JSON file by its file name."""
    return layout.replace("\\", "/").rsplit("/", 1)[-1]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _kernel_names(engine) -> list[str]:
    """The attention and KV-append kernels the engine was built with (select_kernels')."""
    from nanorun.kernels import select_kernels
    return [getattr(f, "__name__", type(f).__name__) for f in select_kernels(engine.device)]


# -- step: device --------------------------------------------------------------------------------
GRAPH_TOLERANCE = 1e-2      # max |graph - eager| / max |eager| over float16 prompt logits


def step_device(argv: list[str]) -> int:
    """What a GPU gives nanorun (issue 7, item 2), the device stage: the ceilings (GEMM rate,
    bf16 8192^3, and copy bandwidth, 1 GiB device to device, as `nanorun bench` measures them),
    the driver's green-context granularity beside the device spec's, the SMs granted to each
    partition of the overlap layout for --model at --batch-tokens (opened by CudaStreams, as
    the executor opens them), and a CUDA-graph replay against eager on --check-model (float16,
    overlap; the replayed pass must give the first pass's greedy tokens exactly, the prompt
    logits the eager engine's within GRAPH_TOLERANCE). Prints each fact as it is read; writes
    them all as JSON. Exit status 0 when every check passed, 1 when one failed, 2 without a
    CUDA device. --rehearse writes the same fields on the CPU, GPU-only facts null."""
    import torch

    parser = argparse.ArgumentParser(prog="gpu_session.py step device")
    parser.add_argument("--out", type=Path, help="JSON path (default: print only)")
    parser.add_argument("--model", default="llama-3-8b",
                        help="the model whose overlap layout is opened (default: llama-3-8b)")
    parser.add_argument("--batch-tokens", type=int, default=1024,
                        help="dense batch of that layout (default: 1024)")
    parser.add_argument("--check-model", default="tiny-llama",
                        help="preset the graph-vs-eager check runs (default: tiny-llama)")
    parser.add_argument("--rehearse", action="store_true",
                        help="on the CPU: the same fields, GPU-only facts null")
    args = parser.parse_args(argv)
    if args.rehearse:
        return write_device(args.out, rehearsal_report(args.model, args.batch_tokens))
    if not torch.cuda.is_available():
        print(f"the device step needs a CUDA device, and torch {torch.__version__} "
              f"(CUDA {torch.version.cuda}) sees none; run it on the GPU machine "
              f"(bench/gpu_session.sh device)", file=sys.stderr)
        return 2

    from nanorun.benchmark.environment import command_line
    report = {"command": command_line(), "date": _now(), "commit": commit(),
              "device": device_facts()}
    say_fact("device", report["device"])
    checks = {}
    for name, fn in (("ceilings", lambda: ceiling_facts(torch.device("cuda"))),
                     ("green_contexts", green_context_facts),
                     ("overlap_partitions", lambda: overlap_partitions(args.model,
                                                                       args.batch_tokens)),
                     ("graph_replay", lambda: graph_replay_vs_eager(args.check_model))):
        try:
            checks[name] = fn()
        except Exception as e:  # a failure is a fact to record, not a reason to stop
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        say_fact(name, checks[name])
    report.update(checks)
    return write_device(args.out, report)


CHECKS = ("ceilings", "green_contexts", "overlap_partitions", "graph_replay")


def write_device(out: Path | None, report: dict) -> int:
    """Sets report["ok"] (every check that ran passed; a rehearsal's skipped ones are null),
    writes it, and returns the exit status."""
    checks = {k: report[k] for k in CHECKS}
    report["ok"] = all(c.get("ok") is not False for c in checks.values()) and any(
        c.get("ok") for c in checks.values())
    if out:
        from nanorun.benchmark.environment import write_result
        write_result(report, out, device="cpu" if report["device"]["multiprocessors"] is None
                     else "cuda")
        print(f"wrote {out}")
    print("all checks passed" if report["ok"] else
          "FAILED: " + ", ".join(k for k, c in checks.items() if c.get("ok") is False))
    return 0 if report["ok"] else 1


def rehearsal_report(model: str, batch_tokens: int) -> dict:
    """The CPU rehearsal's report: the GPU report's fields, GPU-only facts null."""
    import torch
    from nanorun.models import layer_ops

    from nanorun.benchmark.environment import command_line, device_name
    from nanorun.device import device_spec
    from nanorun.layout import overlap

    cpu = torch.device("cpu")
    why = "rehearsal on the CPU: no CUDA device"
    layout = overlap(tuple(op.name for op in layer_ops(1)), batch_tokens, device_spec(cpu))
    report = {"command": command_line(), "date": _now(), "commit": commit(),
              "device": {"name": device_name(cpu), "multiprocessors": None,
                         "compute_capability": None, "memory_gib": None, "driver": None,
                         "torch": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_bindings": _version("cuda-bindings")},
              "ceilings": ceiling_facts(cpu),
              "green_contexts": {"driver_sm_resource": None, "spec": device_spec(cpu).name,
                                 "spec_sm_granularity": None, "spec_sm_count": None,
                                 "ok": None, "skipped": why},
              "overlap_partitions": {"model": model, "batch_tokens": batch_tokens,
                                     "requested": {p.name: p.sm_count for p in layout.partitions},
                                     "granted": None, "green_contexts": None, "how": why,
                                     "summary": None, "device_sms": None, "ok": None},
              "graph_replay": {"ok": None, "skipped": why}}
    for name in CHECKS:
        say_fact(name, report[name])
    return report


# -- the ceilings ----------------------------------------------------------------------------------
def ceiling_facts(device: torch.device) -> dict:
    """GEMM rate and copy bandwidth, measured as `nanorun bench` measures them."""
    import torch

    from nanorun.benchmark.ceilings import measure

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    c = measure(device, dtype)
    return {"gemm_tflops": c.gemm_tflops, "gemm_dtype": c.gemm_dtype, "gemm_size": c.gemm_size,
            "copy_gbps": c.copy_gbps, "measured_on": device.type,
            "ok": c.gemm_tflops > 0 and c.copy_gbps > 0}


def say_fact(what: str, facts: dict) -> None:
    print(f"[device] {what}: {json.dumps(facts)}", flush=True)


# -- the device ------------------------------------------------------------------------------------
def device_facts() -> dict:
    import torch

    from nanorun.benchmark.environment import driver_version

    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "multiprocessors": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": driver_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_bindings": _version("cuda-bindings") or _version("cuda-python")}


# -- green contexts --------------------------------------------------------------------------------
def green_context_facts() -> dict:
    """The device's SM resource as the driver describes it, and the granularity nanorun's layouts
    assume for this device (the spec's)."""
    import torch
    from cuda.bindings import driver

    from nanorun.device import device_spec

    def call(name, *args):
        err, *out = getattr(driver, name)(*args)
        if int(err) != 0:
            raise RuntimeError(f"{name} failed with {driver.cuGetErrorName(err)[1]}")
        return out[0] if len(out) == 1 else out

    torch.zeros(1, device="cuda")       # the primary context, as the backend makes it
    call("cuInit", 0)
    dev = call("cuDeviceGet", torch.cuda.current_device())
    sm = call("cuDeviceGetDevResource", dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM).sm
    fields = {f: getattr(sm, f, None) for f in ("smCount", "minSmPartitionSize",
                                                "smCoscheduledAlignment")}
    fields = {k: int(v) for k, v in fields.items() if v is not None}
    spec = device_spec(torch.device("cuda"))
    driver_step = max(fields.get("minSmPartitionSize", 0), fields.get("smCoscheduledAlignment", 0))
    return {"driver_sm_resource": fields, "spec": spec.name,
            "spec_sm_granularity": spec.sm_granularity, "spec_sm_count": spec.sm_count,
            # Layouts are built with the spec's numbers; they must agree with the driver's.
            "ok": fields.get("smCount") == spec.sm_count
                  and driver_step in (0, spec.sm_granularity)}


# -- the overlap layout's partitions ---------------------------------------------------------------
def overlap_partitions(model: str, batch_tokens: int) -> dict:
    """Open the overlap layout's partitions as the executor does and read back their SMs."""
    import torch
    from nanorun.models import layer_ops, resolve_model

    from nanorun.backends import CudaStreams
    from nanorun.device import device_spec
    from nanorun.layout import overlap

    config, _ = resolve_model(model)
    ops = tuple(op.name for op in layer_ops(1))
    layout = overlap(ops, batch_tokens, device_spec(torch.device("cuda")))
    streams = CudaStreams(layout, "cuda")
    requested = {p.name: p.sm_count for p in layout.partitions}
    return {"model": config.name, "batch_tokens": batch_tokens, "requested": requested,
            "granted": streams.granted, "green_contexts": streams.green, "how": streams.how,
            "summary": streams.summary, "device_sms": streams.device_sms,
            "ok": streams.green and streams.granted == requested}


# -- graph replay against eager --------------------------------------------------------------------
def graph_replay_vs_eager(model: str) -> dict:
    """A graphed and an eager engine on the same requests (step_device's docstring)."""
    import torch

    from nanorun import Engine, SamplingParams

    kw = dict(device="cuda", dtype="float16", layout="overlap", max_batch_tokens=64,
              kv_cache_tokens=16384, weights="random", seed=0)
    graphed = Engine(model, **kw)
    eager = engine_without_graphs(Engine, model, kw)
    ex = graphed.executor
    if not ex.graphs_active:
        return {"ok": False, "error": "the graphed engine runs eagerly: "
                + (ex.graphs.failure if ex.graphs is not None else "graphs are off")}
    g = torch.Generator().manual_seed(0)
    vocab = graphed.model_config.vocab_size
    # Longer than the dense batch (chunked prefill beside decodes) and short ones: mixed sizes.
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (150, 40, 7, 90, 3)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    captured_first = generate(graphed, prompts, params)       # eager runs + captures
    replayed = generate(graphed, prompts, params)             # the same sizes: replays
    want = generate(eager, prompts, params)
    for _ in range(2):      # the first pass captures any new size, the second replays
        logits_graph = [graphed.prompt_logits(p) for p in prompts[:2]]
    logits_eager = [eager.prompt_logits(p) for p in prompts[:2]]
    rel = max(float((a - b).abs().max() / b.abs().max())
              for a, b in zip(logits_graph, logits_eager))
    replay_matches = replayed == captured_first
    return {"model": model, "dtype": "float16", "layout": ex.layout_name,
            "partitions": ex.partition_sms, "how": ex.streams.how,
            "captured_sizes": sorted(ex.graphs.graphs), "graphs_active": ex.graphs_active,
            "replay_tokens_match_first_pass": replay_matches,
            "greedy_tokens_match": replayed == want,
            "first_pass_tokens_match": captured_first == want,
            "prompt_logits_max_rel_diff": rel, "tolerance": GRAPH_TOLERANCE,
            "ok": bool(ex.graphs_active and replay_matches and rel <= GRAPH_TOLERANCE
                       and len(ex.partition_sms) > 1)}


def engine_without_graphs(engine_cls, model: str, kw: dict):
    """An engine built while NANORUN_CUDA_GRAPHS=0 (the executor reads it when built)."""
    from nanorun.executor import GRAPHS_ENV
    before = os.environ.get(GRAPHS_ENV)
    os.environ[GRAPHS_ENV] = "0"
    try:
        return engine_cls(model, **kw)
    finally:
        if before is None:
            del os.environ[GRAPHS_ENV]
        else:
            os.environ[GRAPHS_ENV] = before


# -- step: serve ---------------------------------------------------------------------------------
def step_serve(argv: list[str]) -> int:
    """The serving figures, the serve stage: one model, several workloads, every layout, one
    process, offline, random weights, through nanorun.benchmark.run_traces (the ceilings
    measured once; each layout's engine built once and serving every workload: building an 8B
    engine costs more than serving 64 requests). Every layout runs at one dense batch:
    --max-batch-tokens, else the first layout JSON's own (the tuned one), else 1024. Writes one
    JSON: per workload the full `nanorun bench` report, and a `summary` of what the README's
    table takes from it (total tokens/s, % of optimal, ratio to sequential per layout)."""
    from nanorun.benchmark.cli import CPU_FILTER
    from nanorun.benchmark.report import build_report
    from nanorun.benchmark.runner import BenchConfig, layout_label, run_traces
    from nanorun.benchmark.summary import format_summary
    from nanorun.benchmark.traces import parse_length_filter

    p = argparse.ArgumentParser(prog="gpu_session.py step serve")
    p.add_argument("model")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layouts", nargs="+", default=["sequential", "overlap"])
    p.add_argument("--workloads", nargs="+", default=["const:1024x512", "sharegpt"])
    p.add_argument("--num-requests", nargs="+", type=int, default=[64, 200],
                   help="one per workload")
    p.add_argument("--max-batch-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--filter", default=None, help="as nanorun bench's (default: nanoflow on a "
                                                   f"GPU, {CPU_FILTER} on the CPU)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if len(args.num_requests) != len(args.workloads):
        p.error("give one --num-requests per workload")
    batch = args.max_batch_tokens or _layout_batch(args.layouts) or 1024
    # The CLI's default filters: NanoFlow's on a GPU, a short one on the CPU (const:PxO keeps
    # its own lengths); one filter for every workload, as each `nanorun bench` would apply.
    filt = parse_length_filter(args.filter or (CPU_FILTER if args.device == "cpu" else
                                               "nanoflow"))
    config = BenchConfig(model=args.model,
                         engine_options={"device": args.device, "weights": "random"},
                         max_batch_tokens=batch, layouts=tuple(args.layouts),
                         length_filter=filt, repeats=args.repeats, show_progress=False)
    measurements = run_traces(config, tuple(args.workloads),
                              num_requests=tuple(args.num_requests))
    reports = {w: build_report(m) for w, m in zip(args.workloads, measurements)}
    for report in reports.values():
        print(format_summary(report), flush=True)
    out = {"model": args.model, "device": args.device, "max_batch_tokens": batch,
           "layouts": [layout_label(x) for x in args.layouts], "repeats": args.repeats,
           "summary": {w: serve_summary(r) for w, r in reports.items()}, "reports": reports}
    from nanorun.benchmark.environment import write_result
    write_result(out, args.out, device=args.device)
    print(f"wrote {args.out}")
    failed = sum(run["failed"] for r in reports.values() for run in r["runs"])
    return 1 if failed else 0


def serve_summary(report: dict) -> dict:
    """Per layout: the figures the README's performance table quotes."""
    return {run["nanorun"]["layout"]: {
        "total_token_throughput": run["total_token_throughput"],
        "percent_of_optimal": run["nanorun"]["percent_of_optimal"],
        "throughput_ratio_to_sequential": run["nanorun"]["throughput_ratio_to_sequential"],
        "completed": run["completed"], "failed": run["failed"]}
        for run in report["runs"]}


def _layout_batch(layouts: list[str]) -> int | None:
    """The dense batch of the first layout JSON among `layouts`, if any."""
    for layout in layouts:
        if layout.endswith(".json") and Path(layout).is_file():
            return int(json.loads(Path(layout).read_text())["batch_tokens"])
    return None


# -- step: attention -----------------------------------------------------------------------------
TARGET = dict(seqs=256, context=2048, heads=64, kv_heads=8, head_dim=128)
REHEARSAL = dict(seqs=8, context=256, heads=8, kv_heads=2, head_dim=64)


def step_attention(argv: list[str]) -> int:
    """The attention figure, the attention stage: decode attention at 256 sequences x 2048
    context (bf16, head dim 128, 64 query / 8 KV heads: the issue-4 target) on all SMs, and on
    the attention partition of Llama-3-8B's overlap layout: once on a plain stream with the
    partition's CTA budget, once enqueued on the partition's own stream (a green context where
    the driver allows), as the executor runs it. GB/s and the share of the copy bandwidth
    measured in the same process; timing as bench/kernels.py's (CUDA events, median of 50
    calls after 5 warm-ups); bytes: every K/V row read once per sequence, q read, out
    written. --device cpu (the rehearsal) times the torch reference at 8 sequences x 256
    context instead and writes the same fields."""
    p = argparse.ArgumentParser(prog="gpu_session.py step attention")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    cases = cuda_cases() if args.device == "cuda" else cpu_cases()
    report = {"device": args.device, **cases,
              "ok": all(c["median_ms"] > 0 and c["gb_per_s"] is not None
                        for c in cases["cases"])}
    from nanorun.benchmark.environment import write_result
    write_result(report, args.out, device=args.device)
    for c in report["cases"]:
        print(f"[attention] {c['case']}: {c.get('median_ms')} ms, {c.get('gb_per_s')} GB/s, "
              f"{c.get('share_of_copy_bandwidth')} of copy", flush=True)
    return 0 if report["ok"] else 1


def cuda_cases() -> dict:
    """The three cases on the GPU (step_attention)."""
    import torch

    kernels = _kernels_module()
    from nanorun.models import layer_ops

    from nanorun.backends import CudaStreams
    from nanorun.device import device_spec
    from nanorun.layout import overlap

    problem = kernels.missing_gpu()
    if problem:
        raise SystemExit(problem)
    opts = argparse.Namespace(warmup=5, repeats=50)
    copy = kernels.copy_bandwidth_gbs(opts.warmup, opts.repeats)
    runs = [(TARGET["context"] - 1, 1)] * TARGET["seqs"]
    shape = (runs, TARGET["heads"], TARGET["kv_heads"], TARGET["head_dim"])
    layout = overlap(tuple(op.name for op in layer_ops(1)), 1024,
                     device_spec(torch.device("cuda")))
    streams = CudaStreams(layout, "cuda")
    attn = next(i for i, part in enumerate(streams.partitions) if part.name == "attn")
    budget = streams.partitions[attn].budget
    cases = []
    for name, cta_budget in (("all SMs", None), (f"attention partition's budget ({budget} SMs),"
                                                 f" plain stream", budget)):
        r = kernels.bench_attention(name, *shape, opts, cta_budget=cta_budget,
                                    reference=cta_budget is None)
        cases.append(_row(r.row(copy), name, cta_budget, "plain"))
    # The partition's own stream: what the executor's attention launches get.
    with torch.cuda.stream(streams.stream(attn)):
        r = kernels.bench_attention("attention partition's stream", *shape, opts,
                                    cta_budget=budget, reference=False)
    cases.append(_row(r.row(copy), "attention partition's stream", budget, streams.how))
    return {"target": TARGET, "copy_gbps": copy, "partitions": streams.summary,
            "cases": cases}


def _row(row: dict, name: str, budget, stream: str) -> dict:
    """One attention case as the stage's file records it."""
    return {"case": name, "cta_budget": budget, "stream": stream,
            "median_ms": row["median_ms"], "gb_per_s": row["gb_per_s"],
            "share_of_copy_bandwidth": row["share_of_copy_bandwidth"], "bytes": row["bytes"],
            "max_abs_err_vs_reference": row.get("max_abs_err_vs_reference"),
            "splits": row.get("splits"), "grid": row.get("grid")}


def cpu_cases() -> dict:
    """The rehearsal: the torch reference on the CPU, timed with perf_counter."""
    import torch

    from nanorun.benchmark.ceilings import measure
    from nanorun.ops import paged_attention_torch

    c = REHEARSAL
    g = torch.Generator().manual_seed(0)
    page = 16
    pages = c["seqs"] * (c["context"] // page)
    cache = (pages, page, c["kv_heads"], c["head_dim"])
    k, v = (torch.randn(cache, generator=g, dtype=torch.bfloat16) for _ in range(2))
    tables = torch.randperm(pages, generator=g).int().view(c["seqs"], -1)
    q = torch.randn(c["seqs"], c["heads"], c["head_dim"], generator=g, dtype=torch.bfloat16)
    seq_ids = torch.arange(c["seqs"], dtype=torch.int32)
    positions = torch.full((c["seqs"],), c["context"] - 1, dtype=torch.int64)
    out = torch.empty_like(q)
    args = (q, k, v, tables, seq_ids, positions, c["head_dim"] ** -0.5, out)
    times = []
    for i in range(8):
        t0 = time.perf_counter()
        paged_attention_torch(*args)
        if i >= 2:      # two warm-ups
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    nbytes = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()
    copy = measure(torch.device("cpu"), torch.float32).copy_gbps
    gbs = nbytes / ms / 1e6
    row = {"case": "all cores (torch reference)", "cta_budget": None, "stream": "cpu",
           "median_ms": round(ms, 4), "gb_per_s": round(gbs, 3),
           "share_of_copy_bandwidth": round(gbs / copy, 4), "bytes": nbytes,
           "max_abs_err_vs_reference": None, "splits": None, "grid": None}
    return {"target": c, "copy_gbps": copy, "partitions": None, "cases": [row]}


def _kernels_module():
    """bench/kernels.py, whose timing and attention case the GPU figure reuses."""
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the tests stage's pytest plugin -------------------------------------------------------------
FACT = "[nanorun gpu]"      # the prefix of the facts the GPU tests print


def pytest_runtest_logreport(report) -> None:
    """pytest's hook (this module is the tests stage's plugin, `-p gpu_session` with bench/ on
    PYTHONPATH): one JSON line per finished test, written as it finishes, to
    $NANORUN_TEST_REPORT. pytest's junit XML is written only when the whole run ends, so a run
    stopped at its cap would leave nothing; these lines survive the kill. Each holds the test's
    id, outcome, seconds, a short failure message, and the lines it printed starting
    "[nanorun gpu]" (SMs granted, overlap intervals, replay differences)."""
    path = os.environ.get("NANORUN_TEST_REPORT")
    # One line per test: its call phase, or the setup phase when that failed or skipped it.
    if not path or not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    outcome = report.outcome if report.when == "call" or report.skipped else "error"
    message = ""
    if report.failed:
        message = str(report.longrepr).strip().splitlines()[-1][:500]
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])[:200]
    facts = [line.strip() for line in (report.capstdout or "").splitlines() if FACT in line]
    line = {"nodeid": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3),
            "message": message, "facts": facts}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


# -- unpack --------------------------------------------------------------------------------------
def unpack(argv: list[str]) -> int:
    """Unpack one session call's files into the results tree (docs/gpu_session.md):

        python bench/gpu_session.py unpack FILES_AT bench/results/h200

    FILES_AT is the device reply's folder (env.json, session.log, STAGE.json). Writes under
    DEST: session/ (the call's files as they came back), device.json, attention.json,
    traces/WORKLOAD.json (each serve workload's `nanorun bench` report), profiles/GPU.json and
    layouts/MODEL.GPU.json (the measured profile and re-tune), and prints the figures the
    README's table takes, each with its file. A rehearsal's files (env.json "rehearsal": true)
    are refused unless --rehearsal: CPU figures never land in a GPU's folder by mistake."""
    p = argparse.ArgumentParser(prog="gpu_session.py unpack")
    p.add_argument("files_at", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--rehearsal", action="store_true", help="accept a CPU rehearsal's files")
    args = p.parse_args(argv)
    env_path = args.files_at / "env.json"
    if not env_path.is_file():
        print(f"no env.json in {args.files_at}: not a GPU session's files", file=sys.stderr)
        return 2
    env = json.loads(env_path.read_text())
    if env.get("rehearsal") and not args.rehearsal:
        print("these are a CPU rehearsal's files; refusing to unpack them as GPU results "
              "(--rehearsal to unpack anyway)", file=sys.stderr)
        return 2
    session = args.dest / "session"
    session.mkdir(parents=True, exist_ok=True)
    for f in sorted(args.files_at.iterdir()):
        if f.is_file() and not f.name.endswith(".part"):
            shutil.copy2(f, session / f.name)
    # In the session's order (env.json lists its stages), whichever came back.
    stages = {name: json.loads((args.files_at / f"{name}.json").read_text())
              for name in env.get("stages", {}) if (args.files_at / f"{name}.json").is_file()}
    written = extract(stages, args.dest, env)
    for path in written:
        print(f"wrote {path}")
    for line in readme_figures(stages, args.dest):
        print(line)
    return 0


def extract(stages: dict, dest: Path, env: dict) -> list[Path]:
    """The artifacts other tools read, out of the stage files."""
    written = []

    def put(rel: str, data) -> None:
        if data is None:
            return
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data)
        written.append(path)

    results = {name: s.get("results") or {} for name, s in stages.items()}
    put("device.json", results.get("device", {}).get("device"))
    put("attention.json", results.get("attention", {}).get("attention"))
    serve = results.get("serve", {}).get("serve") or {}
    for workload, report in (serve.get("reports") or {}).items():
        put(f"traces/{workload.replace(':', '-')}.json", report)
    gpu, model = env.get("gpu_spec", "gpu"), env.get("model", "model")
    tune = results.get("tune", {})
    put(f"profiles/{gpu}.json", tune.get("profile"))
    put(f"layouts/{model}.{gpu}.json", tune.get("layout"))
    return written


def readme_figures(stages: dict, dest: Path) -> list[str]:
    """What the README's performance table quotes, with the file each figure is in."""
    lines = ["", "README figures (status of each stage first):"]
    lines += [f"  {name}: {s['status']} in {s['seconds']} s (cap {s['cap_s']} s)"
              for name, s in stages.items()]
    serve = ((stages.get("serve") or {}).get("results") or {}).get("serve") or {}
    for workload, layouts in (serve.get("summary") or {}).items():
        path = dest / "traces" / f"{workload.replace(':', '-')}.json"
        for layout, f in layouts.items():
            ratio = f["throughput_ratio_to_sequential"]
            lines.append(f"  {workload:<16} {layout:<32} {f['total_token_throughput']:>10,.0f} "
                         f"tok/s  {f['percent_of_optimal']:5.1f} % of optimal  "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} sequential   ({path})")
    attention = ((stages.get("attention") or {}).get("results") or {}).get("attention") or {}
    for case in attention.get("cases", []):
        lines.append(f"  decode attention, {case['case']}: {case['gb_per_s']} GB/s, "
                     f"{case['share_of_copy_bandwidth']} of copy   ({dest / 'attention.json'})")
    return lines


MEASURE: dict[str, Callable[[list[str]], int]] = {
    "smoke": step_smoke, "device": step_device, "serve": step_serve, "attention": step_attention}


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
    """The session's own files (env.json, the stage files, what unpack copies out of them):
    whole or not at all, as nanorun's write_result writes the steps' results. The session
    process does not import nanorun (it runs before the build), and these files carry their
    provenance in their own fields (commit, date, device; env.json)."""
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


def generate(engine, prompts, params) -> dict[str, list[int]]:
    """Each prompt's tokens, by request id "0", "1", ... (the benchmarks' one step loop)."""
    from nanorun.benchmark.loop import step_until_done

    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    return step_until_done(engine).token_ids()


if __name__ == "__main__":
    sys.exit(main())
