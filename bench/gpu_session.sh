#!/usr/bin/env bash
# The first GPU session in ONE call of the device tool (issue 16; docs/gpu_session.md).
#
#   bash bench/gpu_session.sh prepare          # HERE, before the call (no GPU): wheels, commit,
#                                              # the layout `nanorun tune` picks on the CPU
#   bash bench/gpu_session.sh                  # on the GPU machine: every stage, <= 9 minutes
#   bash bench/gpu_session.sh STAGE ...        # only these stages (a later session's rerun)
#   bash bench/gpu_session.sh --rehearse       # HERE: the same stages on the CPU, tiny-llama
#
# Stages, most valuable first, each under its own cap (seconds; they add up to 540 = 9 min,
# the build included, so the call ends inside the tool's 10 minutes):
#   smoke      190  build for sm_90a (120; if it fails, the C++ core alone, 30), tune the tiny
#                   model (10), smoke test (30): tiny model, every layout, CUDA kernels,
#                   green contexts, events, graphs, against the CPU's tokens
#   tests       75  the GPU-marked tests, each capped at 30 s
#   device      35  GEMM rate, copy bandwidth, SMs, green-context granularity read back
#   serve      150  Llama-3-8B (random bf16) offline, const:1024x512 and sharegpt, under
#                   sequential, overlap and the CPU-tuned layout, in one process
#   attention   30  decode attention 256 x 2048 on all SMs and on the attention partition
#   tune        60  nanorun profile + a re-tune with it + tune --measure 3, in what is left
#                   (at least 60: the time earlier stages did not use)
#
# What comes back: $OUT holds at most 8 files, each written as soon as its stage ends, so a
# call cut short still returns what finished: env.json, session.log (all that was printed) and
# one STAGE.json per stage (fields: bench/gpu_session.py's docstring). Unpack them with
#   python bench/gpu_session.py unpack FILES_AT bench/results/GPU
#
# Settings: OUT (default ./out), GPU (default from nvidia-smi), NANORUN_COMMIT, BUDGET_S (540),
# NANORUN_GPU_WORK (scratch, /tmp/nanorun-gpu), PYTHON (python3).

set -uo pipefail    # not -e: a failed stage is recorded and the next one runs

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
PY=${PYTHON:-python3}
SITE=${NANORUN_GPU_SITE:-/tmp/nanorun-site}
export PYTHON=$PY PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/nanorun-pycache

log() { printf '[gpu_session %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# -- prepare (here, not on the GPU machine) ----------------------------------------------------
prepare() {
  local wheels=${GPU_WHEELS:-$REPO/../shared/tools/gpu-wheels.sh} gpu=${GPU:-h200}
  [[ -f $wheels ]] || { log "no $wheels: set GPU_WHEELS to the gpu-wheels.sh script"; return 1; }
  bash "$wheels" || return 1
  local sha dirty=""
  sha=$(git rev-parse HEAD) || return 1
  [[ -z $(git status --porcelain --untracked-files=no) ]] || dirty="-dirty"
  echo "$sha$dirty" > .whl/COMMIT
  # The serve stage runs the layout tune picks here, on the CPU, for that GPU's spec (the cost
  # model only): the GPU's minutes go to measuring it, not to searching.
  mkdir -p .whl/layouts
  "$PY" -m nanorun.cli tune llama-3-8b --gpu "$gpu" --out ".whl/layouts/llama-3-8b.$gpu.json" \
    --no-plot --no-progress || return 1
  log "carry .whl (wheels, COMMIT $sha$dirty, layouts/llama-3-8b.$gpu.json); the device's" \
      "tree has no .git"
}

install_wheels() {
  local wheels=(.whl/*.whl)
  if [[ ! -e ${wheels[0]} ]]; then
    log "no .whl/*.whl: optuna is missing, so tune fails (run 'bash bench/gpu_session.sh" \
        "prepare' here and carry .whl)"
    return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" || { log "installing the carried wheels failed"; return 0; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
}

main() {
  local args=() rehearse=0 a
  for a in "$@"; do
    case $a in
      -h|--help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
      prepare) prepare; exit $? ;;
      --rehearse) rehearse=1; args+=("$a") ;;
      *) args+=("$a") ;;
    esac
  done
  export OUT=${OUT:-$REPO/out}
  mkdir -p "$OUT"
  # Everything printed goes to $OUT/session.log too (this run's only), line by line, so a
  # killed call keeps it.
  {
    if (( ! rehearse )); then
      install_wheels
      # CMake finds the CUDA compiler on PATH; the image keeps it in /usr/local/cuda/bin.
      command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
    fi
    "$PY" bench/gpu_session.py ${args[@]+"${args[@]}"}
  } 2>&1 | tee "$OUT/session.log"
  return "${PIPESTATUS[0]}"
}

main "$@"
