#!/usr/bin/env bash
# The GPU session of issue 7, in stages that each fit one call of the device tool.
#
#   bash bench/gpu_session.sh prepare                 # HERE, before the first call (no GPU)
#   bash bench/gpu_session.sh STAGE [STAGE ...]       # on the GPU machine, in one `run` call
#
# Stages, run in the order given (setup runs first on its own whenever a GPU stage is named):
#   prepare       here: downloads the wheels the GPU machine lacks into .whl/ (through
#                 ../shared/tools/gpu-wheels.sh) and stamps the commit into .whl/COMMIT
#   setup         installs .whl/*.whl into /tmp/nanorun-site, builds nanorun with its CUDA
#                 kernels for this GPU (sm_90a on Hopper), writes env.json. Cached: a second
#                 call on the same warm machine rebuilds nothing.
#   build-test    every gpu-marked test (pytest -m gpu -v -s), junit XML
#   device        bench/gpu_device.py: SMs, green-context granularity, overlap partitions,
#                 CUDA-graph replay against eager
#   kernels       bench/kernels.py: kernel bandwidth against the measured copy bandwidth
#   profile-tune  nanorun profile -> profiles/GPU.json; nanorun tune --measure 5 ->
#                 layouts/MODEL.GPU.json; bench/calibration.py -> calibration.json
#   traces        nanorun bench on each workload, offline: sequential, overlap and the tuned
#                 layout side by side -> traces/WORKLOAD.json (+ .png)
#   latency       bench/latency_curve.py on one trace -> latency/TRACE.json
#   suite         the rest of the test suite (not gpu-marked) on the GPU machine, into
#                 build-test's tarball; `all` runs it last, with the time left
#   all           setup build-test device kernels profile-tune traces latency suite
#
# What comes back. The device tool returns at most 8 files from $OUT, at most 2 folders down,
# so every stage writes into /tmp/nanorun-gpu/STAGE/ and, after each of its steps, packs that
# folder into $OUT/STAGE.tar.gz (a step killed by the tool's limit loses only itself; the .part
# file of a pack cut off is not a tarball to unpack). Unpack each into bench/results/GPU/
# (GPU: h100, h200 from the device's name):
#     tar xzf FILES_AT/STAGE.tar.gz -C bench/results/GPU/
# Also in $OUT: session.log (everything printed) and env.json (device, driver, versions, commit).
# Nothing is written into the repository's tree but the build (build/, git-ignored).
#
# Time. One call may run 600 s; the script stops starting steps when fewer than a step's
# minimum are left of BUDGET_S (default 560 s from its start) and kills a running step at that
# deadline, so it always returns, with its tarballs, inside the call. Each step's status (ok,
# failed, timeout, skipped) and seconds go to logs/STAGE.steps.jsonl in its tarball.
#
# Settings (environment):
#   MODEL=llama-3-8b  GPU=<from the device name>  BUDGET_S=560  NANORUN_COMMIT=<sha>
#   NUM_REQUESTS=200  WORKLOADS="azure-conv sharegpt lmsys const:1024x512 azure-code"
#   TUNED_LAYOUT=<path; default: this call's profile-tune output, else
#                 bench/results/GPU/layouts/MODEL.GPU.json>
#   LATENCY_TRACE=sharegpt  LATENCY_REQUESTS=200  LATENCY_FRACTIONS="0.5 0.8 1.0 1.2"
#   DRY_RUN=1: print each step's command instead of running it (no GPU needed; GPU=h100)
#
# Why NUM_REQUESTS=200 (not the 1000 of bench/gpu_traces.py). llama-3-8b's bound on an H100 is
# about 51k tokens/s (nanorun tune's optimal for azure-conv); expect the engine at 15-30k. 200
# requests are 270k tokens of azure-conv, 98k of sharegpt, 61k of lmsys and 307k of
# const:1024x512 (nanoflow filter, seed 0): 736k per layout, 2.2M for the three layouts, 75-150 s
# of serving. Each layout also builds an engine (8B random weights, the KV cache, warm-up, graph
# capture on first use of each batch size): about 15-25 s, 12 times, plus the ceilings each bench
# measures: 200-330 s. Together 280-480 s, which fits the ~470 s left after a fresh build;
# azure-code (261k tokens) runs last, only if time is left. At 1000 requests the serving alone
# is 370-740 s: it cannot fit one call. More requests: split WORKLOADS over calls.

set -uo pipefail    # not -e: a failed step is recorded and the next one runs

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
PY=${PYTHON:-python3}
MODEL=${MODEL:-llama-3-8b}
BUDGET_S=${BUDGET_S:-560}
NUM_REQUESTS=${NUM_REQUESTS:-200}
WORKLOADS=${WORKLOADS:-azure-conv sharegpt lmsys const:1024x512 azure-code}
LATENCY_TRACE=${LATENCY_TRACE:-sharegpt}
LATENCY_REQUESTS=${LATENCY_REQUESTS:-200}
LATENCY_FRACTIONS=${LATENCY_FRACTIONS:-0.5 0.8 1.0 1.2}
WORK=${NANORUN_GPU_WORK:-/tmp/nanorun-gpu}
SITE=${NANORUN_GPU_SITE:-/tmp/nanorun-site}
DRY_RUN=${DRY_RUN:-}
DEADLINE=$(( $(date +%s) + BUDGET_S ))
FAILED=0
export PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/nanorun-pycache

ALL_STAGES=(build-test device kernels profile-tune traces latency suite)

usage() {
  sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

log() { printf '[gpu_session %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
left() { echo $(( DEADLINE - $(date +%s) )); }

# -- prepare (here, not on the GPU machine) ----------------------------------------------------
prepare() {
  local wheels=${GPU_WHEELS:-$REPO/../shared/tools/gpu-wheels.sh}
  [[ -f $wheels ]] || { log "no $wheels: set GPU_WHEELS to the gpu-wheels.sh script"; return 1; }
  bash "$wheels" || return 1
  local sha dirty=""
  sha=$(git rev-parse HEAD) || return 1
  [[ -z $(git status --porcelain --untracked-files=no) ]] || dirty="-dirty"
  echo "$sha$dirty" > .whl/COMMIT
  log "carry .whl (wheels + COMMIT $sha$dirty); the device's tree has no .git"
}

# -- steps ----------------------------------------------------------------------------------------
# step NAME MIN_S CMD...: run CMD, its output into the stage log, killed at the deadline; skipped
# when fewer than MIN_S seconds are left. Records the outcome, then packs the stage.
step() {
  local name=$1 min=$2; shift 2
  local remaining status rc=0 t0
  remaining=$(left)
  if (( remaining < min )); then
    log "$name: skipped, ${remaining}s left of the budget and it needs ${min}s"
    record "$name" skipped "" 0 "$@"
    return 0
  fi
  log "$name: $*"
  t0=$(date +%s)
  if [[ -n $DRY_RUN ]]; then
    status=dry-run
  else
    timeout -k 15 "$remaining" "$@" 2>&1 | tee -a "$STAGE_LOG"
    rc=${PIPESTATUS[0]}
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    (( rc == 0 )) || FAILED=1
  fi
  log "$name: $status (exit $rc, $(( $(date +%s) - t0 )) s)"
  record "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$@"
  pack
  return "$rc"
}

record() {
  local name=$1 status=$2 rc=$3 seconds=$4; shift 4
  "$PY" - "$name" "$status" "$rc" "$seconds" "$@" >> "$STAGE_DIR/logs/$STAGE.steps.jsonl" <<'EOF'
import json, shlex, sys
name, status, rc, seconds, *cmd = sys.argv[1:]
print(json.dumps({"step": name, "status": status, "exit": int(rc) if rc else None,
                  "seconds": int(seconds), "command": shlex.join(cmd)}))
EOF
}

pack() {
  [[ -n ${OUT:-} ]] || return 0
  tar czf "$OUT/$TARBALL.part" -C "$STAGE_DIR" . && mv "$OUT/$TARBALL.part" "$OUT/$TARBALL"
}

# A stage's folder and tarball are its own, except suite's: it adds to build-test's, so that a
# call running every stage returns 8 files (6 tarballs, session.log, env.json), the tool's most.
begin_stage() {
  STAGE=$1
  local owner=$STAGE
  [[ $STAGE == suite ]] && owner=build-test
  STAGE_DIR=$WORK/$owner
  TARBALL=$owner.tar.gz
  [[ $STAGE == "$owner" ]] && rm -rf "$STAGE_DIR"
  mkdir -p "$STAGE_DIR/logs"
  STAGE_LOG=$STAGE_DIR/logs/$STAGE.log
  log "stage $STAGE ($(left) s left)"
  [[ -f $WORK/env.json ]] && cp "$WORK/env.json" "$STAGE_DIR/logs/$STAGE.env.json"
}

# -- setup ----------------------------------------------------------------------------------------
install_wheels() {
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  local wheels=(.whl/*.whl)
  if [[ ! -e ${wheels[0]} ]]; then
    log "no .whl/*.whl: optuna is missing, so tune fails (run 'bash bench/gpu_session.sh" \
        "prepare' here and carry .whl)"
    return 0
  fi
  [[ -f $SITE/.installed ]] && return 0
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" && touch "$SITE/.installed"
}

cuda_arch() {
  # Hopper's own instructions (wgmma, setmaxnreg) need the "a" target: 9.0 -> 90a.
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)
  case $cap in 90) echo 90a ;; "") echo 90a ;; *) echo "$cap" ;; esac
}

build_extension() {
  local arch stamp
  arch=${CUDA_ARCH:-$(cuda_arch)}
  stamp=$(find cuda CMakeLists.txt pyproject.toml -type f -print0 | sort -z | xargs -0 cat |
          sha256sum | cut -c1-16)-$arch
  if [[ $(cat "$WORK/build.stamp" 2>/dev/null) == "$stamp" ]] &&
     "$PY" -c "import nanorun._cuda" 2>/dev/null; then
    log "nanorun is built for sm_$arch from these sources already"
    return 0
  fi
  command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
  log "building nanorun for sm_$arch ($(left) s left)"
  NANORUN_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$arch" timeout -k 15 "$(left)" \
    "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
  "$PY" -c "import nanorun._cuda" || { log "the build made no nanorun._cuda"; return 1; }
  echo "$stamp" > "$WORK/build.stamp"
}

commit() {
  if [[ -n ${NANORUN_COMMIT:-} ]]; then echo "$NANORUN_COMMIT"
  elif [[ -s .whl/COMMIT ]]; then cat .whl/COMMIT
  elif git rev-parse HEAD >/dev/null 2>&1; then
    echo "$(git rev-parse HEAD)$([[ -z $(git status --porcelain --untracked-files=no) ]] || echo -dirty)"
  else echo unknown
  fi
}

write_env() {
  NANORUN_COMMIT=$(commit) CUDA_ARCH=${CUDA_ARCH:-$(cuda_arch)} "$PY" - > "$WORK/env.json" <<'EOF'
import datetime, json, os, platform, subprocess
from importlib import metadata

def run(*cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

smi = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
          "--format=csv,noheader")
gpus = [dict(zip(("name", "driver", "memory", "compute_cap"), map(str.strip, line.split(","))))
        for line in (smi or "").splitlines()]
nvcc = run("nvcc", "--version") or run("/usr/local/cuda/bin/nvcc", "--version")
import torch
try:
    import nanorun._cuda
    cuda_module = "built"
except ImportError as e:
    cuda_module = f"not importable: {e}"
print(json.dumps({
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": os.environ["NANORUN_COMMIT"],
    "gpus": gpus, "cuda_arch_built": os.environ["CUDA_ARCH"],
    "nanorun_cuda_module": cuda_module,
    "python": platform.python_version(), "kernel": platform.release(),
    "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    "torch_sees_cuda": torch.cuda.is_available(),
    "nvcc": nvcc.splitlines()[-1] if nvcc else None,
    "packages": {n: version(n) for n in ("cuda-bindings", "cuda-python", "cupy-cuda13x",
                                         "cupy-cuda12x", "numba", "triton", "optuna",
                                         "transformers", "numpy", "pytest")},
}, indent=1))
EOF
  [[ -n ${OUT:-} ]] && cp "$WORK/env.json" "$OUT/env.json"
  return 0
}

gpu_slug() {
  if [[ -n ${GPU:-} ]]; then echo "$GPU"; return; fi
  local name
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  [[ -n $name ]] || { log "no GPU visible (nvidia-smi): set GPU=h100 for a dry run" >&2; return 1; }
  "$PY" -c 'import sys; sys.path.insert(0, "bench"); from gpu_traces import gpu_slug
print(gpu_slug(sys.argv[1]))' "$name"
}

setup() {
  mkdir -p "$WORK"
  [[ -n $DRY_RUN ]] && { log "dry run: no install, no build"; write_env; return 0; }
  log "setup: wheels into $SITE, then the build"
  install_wheels || { log "installing the carried wheels failed"; return 1; }
  build_extension 2>&1 | tee "$WORK/build.log"
  local rc=${PIPESTATUS[0]}
  write_env
  return "$rc"
}

# -- stages ---------------------------------------------------------------------------------------
stage_build_test() {
  cp "$WORK/build.log" "$STAGE_DIR/logs/build.log" 2>/dev/null
  step gpu-tests 60 "$PY" -m pytest -m gpu -v -s -p no:cacheprovider \
    --junitxml="$STAGE_DIR/logs/junit-gpu.xml"
}

stage_device() {
  step gpu-device 60 "$PY" bench/gpu_device.py --model "$MODEL" --out "$STAGE_DIR/device.json"
}

stage_kernels() {
  step kernels 60 "$PY" bench/kernels.py --out "$STAGE_DIR/kernels.json"
}

stage_profile_tune() {
  local profile=$STAGE_DIR/profiles/$GPU_NAME.json layout=$STAGE_DIR/layouts/$MODEL.$GPU_NAME.json
  local with_profile=(--profile "$profile")
  step profile 120 "$PY" -m nanorun.cli profile "$MODEL" --device cuda --out "$profile"
  if [[ ! -f $profile && -z $DRY_RUN ]]; then
    log "no profile: tuning on the uncalibrated cost model"
    with_profile=()
  fi
  step tune 90 "$PY" -m nanorun.cli tune "$MODEL" --gpu "$GPU_NAME" "${with_profile[@]}" \
    --measure 5 --device cuda --out "$layout" --plot "${layout%.json}.png" --no-progress
  local layouts=(sequential overlap)
  [[ -f $layout || -n $DRY_RUN ]] && layouts+=("$layout")
  step calibration 60 "$PY" bench/calibration.py "$MODEL" --gpu "$GPU_NAME" "${with_profile[@]}" \
    --device cuda --layouts "${layouts[@]}" --out "$STAGE_DIR/calibration.json"
}

tuned_layout() {
  local c
  for c in "${TUNED_LAYOUT:-}" "$WORK/profile-tune/layouts/$MODEL.$GPU_NAME.json" \
           "bench/results/$GPU_NAME/layouts/$MODEL.$GPU_NAME.json"; do
    [[ -n $c && -f $c ]] && { echo "$c"; return 0; }
  done
  return 1
}

# The dense batch every layout of one bench runs at: the tuned layout's (bench requires the
# engine's max_batch_tokens to equal it), else 1024.
batch_tokens() {
  if [[ -n ${1:-} ]]; then
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["batch_tokens"])' "$1"
  else
    echo 1024
  fi
}

stage_traces() {
  local tuned layouts=(overlap) batch w stem
  if tuned=$(tuned_layout); then
    layouts+=("$tuned")
    log "tuned layout: $tuned"
  else
    log "no tuned layout (run profile-tune, or set TUNED_LAYOUT): sequential and overlap only"
  fi
  batch=$(batch_tokens "${tuned:-}")
  mkdir -p "$STAGE_DIR/traces"
  for w in $WORKLOADS; do
    stem=${w//:/-}
    step "bench-$stem" 60 "$PY" -m nanorun.cli bench "$MODEL" --device cuda --weights random \
      --trace "$w" --num-requests "$NUM_REQUESTS" --max-batch-tokens "$batch" \
      --layout "${layouts[@]}" --result-json "$STAGE_DIR/traces/$stem.json" \
      --plot "$STAGE_DIR/traces/$stem.png" --no-progress
  done
}

stage_latency() {
  local tuned layout=overlap batch peak stem=${LATENCY_TRACE//:/-} peak_args=()
  tuned=$(tuned_layout) && layout=$tuned
  batch=$(batch_tokens "${tuned:-}")
  for peak in "$WORK/traces/traces/$stem.json" "bench/results/$GPU_NAME/traces/$stem.json"; do
    [[ -f $peak ]] && { peak_args=(--peak-from "$peak"); break; }
  done
  # shellcheck disable=SC2086  # the fractions are words
  step latency-curve 180 "$PY" bench/latency_curve.py "$MODEL" --device cuda \
    --trace "$LATENCY_TRACE" --num-requests "$LATENCY_REQUESTS" --layout "$layout" \
    --max-batch-tokens "$batch" --fractions $LATENCY_FRACTIONS "${peak_args[@]}" \
    --out "$STAGE_DIR/latency/$stem.json"
}

stage_suite() {
  local parallel=()
  "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8 --dist loadfile)
  step test-suite 120 "$PY" -m pytest -m "not gpu" -q -p no:cacheprovider "${parallel[@]}" \
    --junitxml="$STAGE_DIR/logs/junit-suite.xml"
}

# -- main -----------------------------------------------------------------------------------------
main() {
  (( $# )) || usage
  local stages=() s
  for s in "$@"; do
    case $s in
      -h|--help) usage 0 ;;
      prepare) prepare; exit $? ;;
      all) stages+=("${ALL_STAGES[@]}") ;;
      setup|build-test|device|kernels|profile-tune|traces|latency|suite) stages+=("$s") ;;
      *) echo "unknown stage '$s'; stages: prepare setup ${ALL_STAGES[*]} all" >&2; exit 2 ;;
    esac
  done
  if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/session.log") 2>&1
    local tee_pid=$!
    # shellcheck disable=SC2064  # the pid is known now
    trap "exec 1>&- 2>&-; wait $tee_pid 2>/dev/null" EXIT    # session.log complete on return
  else
    log "OUT is not set: results stay in $WORK"
  fi
  log "stages: ${stages[*]}; budget ${BUDGET_S}s; model $MODEL"
  NANORUN_COMMIT=$(commit)
  export NANORUN_COMMIT    # the tree here has no .git: what reports should record
  setup || { log "setup failed: see the log above; stopping"; exit 1; }
  GPU_NAME=$(gpu_slug) || exit 2     # after setup: it imports bench/gpu_traces.py, so nanorun
  for s in "${stages[@]}"; do
    [[ $s == setup ]] && continue
    begin_stage "$s"
    "stage_${s//-/_}"
    pack
  done
  log "done with $(left) s of the budget left; $( ((FAILED)) && echo 'SOME STEPS FAILED' ||
      echo 'every step that ran passed'); results in ${OUT:-$WORK}:"
  ls -l "${OUT:-$WORK}"
  return "$FAILED"
}

main "$@"
