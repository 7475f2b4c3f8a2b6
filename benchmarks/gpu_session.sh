#!/usr/bin/env bash
# The checks a session with a lent GPU runs. A task gets little device time (15 minutes in all,
# the machine's start included, at most 10 minutes per call), so `all` runs everything in ONE
# call, most important first, each step under a deadline so that the call ends within
# $BUDGET_S seconds (default 480) and every step that finished has left its logs and results:
#
#   bash benchmarks/gpu_session.sh all       # build -> bench -> test -> profile -> ncu, within
#                                            #   $BUDGET_S; prints steps.tsv and a results table last
#
# or one step alone (a warm machine's rerun of a step that ran out of time):
#
#   bash benchmarks/gpu_session.sh build     # install the package + extension WITH its CUDA path
#   bash benchmarks/gpu_session.sh bench     # bench_refine: every backend + the LLaMA-7B set, with
#                                            #   the triton variants in $VARIANTS side by side
#                                            #   ($BENCH: shapes, set (-> llama7b_set/) or both);
#                                            #   its match column is the parity check at LLaMA sizes
#   bash benchmarks/gpu_session.sh test      # pytest -m gpu tests ($TESTS: quick = all but the
#                                            #   long ones (LLaMA-size parity, deepest queue),
#                                            #   llama = only those, all)
#   bash benchmarks/gpu_session.sh profile   # profile_refine for $SHAPES (default 4096x4096);
#                                            #   SWEEP=1 adds the launch-knob sweep (minutes of compiles)
#   bash benchmarks/gpu_session.sh ncu       # Nsight Compute counters of each select/cycles kernel
#                                            #   (row kernel one per row and seeded, streamed 4
#                                            #   warps, warp per row: profile_refine.NCU_LAUNCHES)
#
# Results go to $OUT/gpu_session/ (the device tool's output folder; /tmp without it): every
# step's output in ONE log, session.log (the device tool returns at most 8 files from $OUT),
# steps.tsv (step, exit code, seconds; 124 = stopped at its deadline), bench_refine.{csv,json}
# and llama7b_set/bench_refine.json. Copy the bench files to benchmarks/results/<GPU name>/
# and commit them.
# bench_refine rewrites its results after every measurement, so a bench stopped at its deadline
# still returns what it measured ("complete": false in the JSON).
# Uses the machine's own python3 with its torch/triton (no venv): the GPU machine has no network.
# DRY_RUN=1 prints each step's command and deadline instead of running it, as if every step
# ran to its deadline (the worst case: the steps it would then skip say so) (`all`: into
# steps-dry-run.tsv, so a real run's steps.tsv is left alone; one step: prints its name and
# runs nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: gpu_session.sh all|build|bench|test|profile|ncu}"
dest="${OUT:-/tmp}/gpu_session"
mkdir -p "$dest"
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
# the device machine promises python3 (the one with torch); `python` may not exist there
PY="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
log="$dest/session.log"
# logged NAME: a header in the one log, then the step's output appended to it (tee -i: a
# deadline's SIGINT leaves tee running, so the end of the output still reaches the log)
logged() { printf '\n===== %s (%s UTC)\n' "$1" "$(date -u +%H:%M:%S)" >> "$log"; tee -i -a "$log"; }
# GPU-marked test files, most telling first (a step stopped at its deadline has run these):
# the tuning, value checks and Triton parity, then the other backends, the driver, and last
# the CMake + nvcc build of the C++ core (minutes of compiles)
TEST_FILES=(tests/test_launch_tuning.py tests/test_value_checks.py tests/test_triton_parity.py
            tests/test_torch_backend.py tests/test_stats.py tests/test_ext.py tests/test_api.py
            tests/test_driver.py tests/test_ext_build.py)
# extra triton rows of the bench (full refine time, LLaMA-7B set included): the streamed kernel
# pinned, beside auto (which picks among its candidates on the first call). The other launches
# in question (row kernel one per row or persistent, streamed at 8 or 4
# programs per SM or as a warp per row, serial queue search) are auto's tuning candidates:
# their select+cycles times for every problem class land in the bench JSON's
# triton_tuned_launches, so they need no rows of their own (fewer compiles and runs)
VARIANTS="${VARIANTS-select=stream}"
BUDGET_S="${BUDGET_S:-480}"
started=$SECONDS
steps_file="$dest/steps.tsv"
[[ "${DRY_RUN:-0}" != 1 ]] || steps_file="$dest/steps-dry-run.tsv"

remaining() { echo $(( BUDGET_S - (SECONDS - started) )); }

# run_step LABEL CAP STEP [VAR=VALUE...]: this script's STEP (with those variables) under a
# deadline of min(CAP, time left); a line in steps.tsv; never stops `all` (later steps run)
run_step() {
  local label="$1" cap="$2" sub="$3"; shift 3
  local left; left=$(remaining)
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then
    printf '%s\tskipped\t0\n' "$label" | tee -a "$steps_file"
    return 0
  fi
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\tdry-run\t%d\t%s %s\n' "$label" "$limit" "$sub" "$*" | tee -a "$steps_file"
    started=$(( started - limit ))       # the worst case: every step runs to its deadline
    return 0
  fi
  local t0=$SECONDS rc=0
  # SIGINT first (to the whole process group): pytest then prints what ran (the steps' tee -i
  # ignores it, so that the end of the output still reaches the log); -k: kill 15 s later
  env "$@" timeout -s INT -k 15 "$limit" bash "$0" "$sub" > /dev/null 2>&1 || rc=$?
  printf '%s\t%d\t%d\n' "$label" "$rc" $(( SECONDS - t0 )) | tee -a "$steps_file"
}

# the long GPU tests: parity at LLaMA sizes (the bench's match column checks it first) and the
# deepest queue that fits (kernels sorting 4096-8192 keys: ~1 min of compiles, AOT on a CPU)
long_tests="test_gpu_llama_sizes or test_gpu_deepest_queue_that_fits"
case "${TESTS:-all}" in
  quick) test_args=(-k "not ($long_tests)") ;;
  llama) test_args=(-k "$long_tests") ;;
  all)   test_args=() ;;
  *) echo "TESTS must be quick, llama or all, got '${TESTS}'" >&2; exit 2 ;;
esac

if [[ "${DRY_RUN:-0}" == 1 && "$step" =~ ^(build|bench|test|profile|ncu)$ ]]; then
  printf '%s\tdry-run\t(no deadline)\n' "$step"      # one step alone: nothing runs
  exit 0
fi

case "$step" in
  all)
    : > "$steps_file"
    [[ "${DRY_RUN:-0}" == 1 ]] || : > "$log"        # this run's log (single steps append to it)
    # caps: the build ~1-2 min; the per-shape bench (every backend and variant against the
    # reference: the parity check at LLaMA sizes) compiles each kernel variant once, and the
    # Triton cache then serves the LLaMA-7B set and the tests; the LLaMA-size test cases repeat
    # the bench's parity check, so they come last
    run_step build 200 build
    run_step bench_shapes 240 bench BENCH=shapes
    run_step bench_set 90 bench BENCH=set
    run_step test_quick 90 test TESTS=quick
    run_step profile 60 profile
    run_step ncu 90 ncu
    run_step test_llama 600 test TESTS=llama
    echo "gpu_session all: $(( SECONDS - started )) s of ${BUDGET_S} s; logs and $(basename "$steps_file") in $dest"
    cat "$steps_file"
    [[ "${DRY_RUN:-0}" == 1 ]] || "$PY" -c 'import sys; sys.path.insert(0, "benchmarks")
from bench_common import print_summary; print_summary(sys.argv[1:])' \
      "$dest/bench_refine.json" "$dest/llama7b_set/bench_refine.json"
    ;;
  build)
    {
      # the toolkit root: the first candidate with include/cuda_runtime.h. The nvcc on PATH may
      # be a wrapper script (ENV.md: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`), whose own
      # prefix is not the root, so its exec target is asked too
      nvcc_path="$(command -v nvcc || true)"
      home=""
      for cand in "${CUDA_HOME:-}" \
          "$([[ -n "$nvcc_path" ]] && dirname "$(dirname "$(readlink -f "$nvcc_path")")")" \
          "$([[ -n "$nvcc_path" ]] && grep -aoE '/[^ "]*/bin/nvcc' "$nvcc_path" | head -n 1 | xargs -r dirname | xargs -r dirname)" \
          /usr/local/cuda /usr/local/cuda-*; do
        if [[ -n "$cand" && -f "$cand/include/cuda_runtime.h" ]]; then home="$cand"; break; fi
      done
      cuda_mode=1
      if [[ -n "$home" ]]; then
        export CUDA_HOME="$home"
      else
        echo "no CUDA toolkit root found (nvcc: ${nvcc_path:-none}): building the C++ CPU path only"
        cuda_mode=0
      fi
      echo "CUDA_HOME=${CUDA_HOME:-unset}"
      export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
      DSNOT_BUILD_EXT=1 DSNOT_BUILD_CUDA=$cuda_mode "$PY" -m pip install --no-build-isolation --no-deps -q -e .
      "$PY" -c "import torch, dsnot_kernels.ext as e; print('ext CUDA path:', e.has_cuda(), torch.cuda.get_device_name())"
    } 2>&1 | logged build
    ;;
  bench)
    extra=()
    [[ -z "$VARIANTS" ]] || extra=(--triton-variants "$VARIANTS")
    case "${BENCH:-both}" in
      shapes) out="$dest" ;;
      set)    out="$dest/llama7b_set"; extra+=(--shapes none --llama7b-set) ;;
      both)   out="$dest"; extra+=(--llama7b-set) ;;
      *) echo "BENCH must be shapes, set or both, got '${BENCH}'" >&2; exit 2 ;;
    esac
    "$PY" benchmarks/bench_refine.py --device cuda --out "$out" "${extra[@]}" 2>&1 \
      | logged "bench_refine ${BENCH:-both}"
    ;;
  test)
    "$PY" -m pytest -q -m gpu "${TEST_FILES[@]}" "${test_args[@]}" 2>&1 | logged "test ${TESTS:-all}"
    ;;
  profile)
    extra=()
    [[ "${SWEEP:-0}" != 1 ]] || extra=(--sweep)
    "$PY" benchmarks/profile_refine.py --shapes "${SHAPES:-4096x4096}" "${extra[@]}" 2>&1 \
      | logged profile_refine
    ;;
  ncu)
    # Nsight Compute: counters of each select/cycles kernel of one refine per launch variant
    # (works where the machine's runtime exposes the counters; --clock-control none leaves the
    # card's clocks alone)
    NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1 || true)"
    if [[ -z "$NCU" ]]; then
      echo "ncu: not found on this machine" | logged ncu
      exit 3
    fi
    "$NCU" --clock-control none --target-processes all -k regex:'select|cycles' \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      --section LaunchStats --section WarpStateStats --section SchedulerStats \
      "$PY" benchmarks/profile_refine.py --ncu --shapes "${SHAPES:-4096x4096}" 2>&1 | logged ncu
    ;;
  *)
    echo "unknown step '$step': use all, build, bench, test, profile or ncu" >&2
    exit 2
    ;;
esac
