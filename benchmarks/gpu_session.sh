#!/usr/bin/env bash
# The checks a session with a lent GPU runs, one step per call (each fits a 10-minute limit):
#
#   bash benchmarks/gpu_session.sh build     # install the package + extension WITH its CUDA path
#   bash benchmarks/gpu_session.sh test      # pytest -m gpu tests (parity at LLaMA sizes, ext CUDA)
#   bash benchmarks/gpu_session.sh bench     # bench_refine: every backend + the LLaMA-7B set, with
#                                            #   the triton variants in $VARIANTS side by side
#   bash benchmarks/gpu_session.sh profile   # profile_refine --sweep (per-kernel times, knob sweeps)
#                                            #   for $SHAPES (default 4096x4096; one shape per call)
#
# Logs and result files go to $OUT/gpu_session/ (the device tool's output folder; /tmp without
# it); copy bench_refine.{csv,json} from there to benchmarks/results/<GPU name>/ and commit them.
# Uses the machine's own torch/triton (no venv): the GPU machine has no network.
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: gpu_session.sh build|test|bench|profile}"
dest="${OUT:-/tmp}/gpu_session"
mkdir -p "$dest"
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
VARIANTS="${VARIANTS:-queue_search=serial;select=stream;select=stream,num_warps=1,chunk=128,programs_per_sm=16}"

case "$step" in
  build)
    # the toolkit root, not the nvcc wrapper's prefix (ENV.md)
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    export CUDA_HOME TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    DSNOT_BUILD_EXT=1 DSNOT_BUILD_CUDA=1 python -m pip install --no-build-isolation --no-deps -q -e . \
      2>&1 | tee "$dest/build.log"
    python -c "import torch, dsnot_kernels.ext as e; print('ext CUDA path:', e.has_cuda(), torch.cuda.get_device_name())" \
      | tee -a "$dest/build.log"
    ;;
  test)
    python -m pytest -q -m gpu tests 2>&1 | tee "$dest/test_gpu.log"
    ;;
  bench)
    python benchmarks/bench_refine.py --device cuda --llama7b-set --triton-variants "$VARIANTS" \
      --out "$dest" 2>&1 | tee "$dest/bench_refine.log"
    ;;
  profile)
    # one shape per call keeps the sweep's Triton compiles inside the 10-minute limit
    python benchmarks/profile_refine.py --sweep --shapes "${SHAPES:-4096x4096}" 2>&1 \
      | tee "$dest/profile_refine.log"
    ;;
  *)
    echo "unknown step '$step': use build, test, bench or profile" >&2
    exit 2
    ;;
esac
