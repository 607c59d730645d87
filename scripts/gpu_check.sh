#!/usr/bin/env bash
# make gpu-check: everything a GPU machine should confirm about the CUDA kernels, in one command and
# one report file (docs/cuda.md). For a bare machine: a preinstalled torch >= 2.11 with CUDA, nvcc,
# ninja, pytest and hypothesis; no network, no pip, no mmcv/mmdet (torchvision optional).
#
#   1. build mmdet_dcnv2/_C in place for the visible GPU with all cores (scripts/build_extension.py:
#      torch.utils.cpp_extension.load with setup.py's sources and flags; no setuptools build);
#   2. the CUDA op tests (tests/test_cuda_gpu.py, the `cuda` tests of the op test files where
#      torchvision is importable) and the host-run kernel tests;
#   3. compute-sanitizer --tool memcheck on a short run of every kernel (where the tool works);
#   4. benchmarks: conv vs cuDNN, pool vs RoIAlign (torchvision), deterministic vs atomic backward.
#
# Environment: PYTHON (default python3), GPU_CHECK_REPORT (default work_dirs/gpu_check/report.txt),
# MAX_JOBS (default: all cores), TORCH_CUDA_ARCH_LIST (default: the visible GPU's).
# Without a GPU it stops after the environment check, saying so (exit 2), unless
# GPU_CHECK_BUILD_WITHOUT_GPU=1, which still runs the build and the (then skipped) tests.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
REPORT=${GPU_CHECK_REPORT:-work_dirs/gpu_check/report.txt}
mkdir -p "$(dirname "$REPORT")"
: > "$REPORT"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, not an installed copy
# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # deterministic mode's cuBLAS condition
START=$(date +%s)
FAILED=()

log() { echo "$*" | tee -a "$REPORT"; }
section() { log ""; log "== $* =="; }

# run_step NAME TIMEOUT_S CMD...: runs CMD with a time limit, its output into the report (and the
# console), and records a failure.
run_step() {
  local name=$1 limit=$2 t0 rc
  shift 2
  section "$name ($*)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$REPORT"
  rc=${PIPESTATUS[0]}
  log "-- $name: exit $rc after $(( $(date +%s) - t0 )) s"
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && log "-- $name: stopped at its time limit of $limit s"
    FAILED+=("$name")
  fi
  return "$rc"
}

finish() {
  section "summary"
  log "total: $(( $(date +%s) - START )) s"
  if [ ${#FAILED[@]} -eq 0 ] && [ "${HAS_GPU:-0}" != 1 ]; then
    log "gpu-check: the build and the host-run tests passed, but without a GPU nothing ran on one"
    echo "gpu-check: report written to $REPORT"
    exit 2
  elif [ ${#FAILED[@]} -eq 0 ]; then
    log "gpu-check: all steps passed"
  else
    log "gpu-check: FAILED steps: ${FAILED[*]}"
  fi
  echo "gpu-check: report written to $REPORT"
  [ ${#FAILED[@]} -eq 0 ]
  exit $?
}

section "environment"
log "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host: $(hostname); cores: $(nproc); MAX_JOBS=$MAX_JOBS"
log "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')$(git diff --quiet 2>/dev/null || echo ' (modified)')"
if ! "$PYTHON" - <<'PY' 2>&1 | tee -a "$REPORT"; then
import importlib.util, shutil, sys
import torch
from torch.utils import cpp_extension
problems = []
version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"CUDA_HOME {cpp_extension.CUDA_HOME}")
if version < (2, 11):
    problems.append(f"torch >= 2.11 is needed, found {torch.__version__}")
if torch.version.cuda is None:
    problems.append("this torch is a CPU-only build (torch.version.cuda is None)")
if cpp_extension.CUDA_HOME is None:
    problems.append("no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)")
for module in ("ninja", "pytest", "hypothesis"):
    if importlib.util.find_spec(module) is None and not (module == "ninja" and shutil.which("ninja")):
        problems.append(f"{module} is not installed")
for module in ("torchvision", "mmcv", "mmdet"):
    print(f"{module}: {'present' if importlib.util.find_spec(module) else 'absent'}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
              f"{p.multi_processor_count} SMs")
    print(f"TF32: torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
          f"torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
          f"float32_matmul_precision={torch.get_float32_matmul_precision()}")
else:
    print("GPU: none visible (torch.cuda.is_available() is False)")
for problem in problems:
    print(f"gpu-check: {problem}")
sys.exit(1 if problems else 0)
PY
  log "gpu-check: the environment cannot run the check (see above)"
  FAILED+=("environment")
  finish
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$REPORT"

HAS_GPU=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$HAS_GPU" != 1 ]; then
  if [ "${GPU_CHECK_BUILD_WITHOUT_GPU:-0}" != 1 ]; then
    log "gpu-check: no GPU is visible to torch: nothing to check here. Run 'make gpu-check' on a machine with"
    log "an NVIDIA GPU (GPU_CHECK_BUILD_WITHOUT_GPU=1 still runs the build and the test collection)."
    echo "gpu-check: report written to $REPORT"
    exit 2
  fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  log "gpu-check: no GPU; building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST anyway (GPU_CHECK_BUILD_WITHOUT_GPU=1)"
elif [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi

export MMDET_DCNV2_WITH_CUDA=1
run_step build 420 env VERBOSE=1 "$PYTHON" scripts/build_extension.py --require-cuda || finish

TESTS=(tests/test_cuda_gpu.py)
if "$PYTHON" -c "import torchvision" 2> /dev/null; then
  TESTS+=(tests/test_modulated_deform_conv.py tests/test_deform_roi_pool.py)
else
  log "gpu-check: torchvision is absent: the op test files that import it are left out (tests/test_cuda_gpu.py covers CUDA vs CPU)"
fi
run_step "CUDA op tests" 300 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider "${TESTS[@]}"
run_step "host-run kernel tests" 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda_host.py \
  tests/test_setup_cuda_choice.py

if [ "$HAS_GPU" = 1 ]; then
  SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [ -x "$SANITIZER" ] && "$SANITIZER" --version > /dev/null 2>&1; then
    # No caching allocator: every tensor its own allocation, so an out-of-bounds access leaves it.
    run_step "compute-sanitizer memcheck" 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
      --error-exitcode 3 --print-limit 20 "$PYTHON" scripts/gpu_memcheck.py
  else
    log "gpu-check: compute-sanitizer not found or not working here: memcheck left out"
  fi
  run_step "conv benchmark (vs cuDNN conv2d)" 150 "$PYTHON" benchmarks/bench_deform_conv.py --device cuda --quick
  if "$PYTHON" -c "import torchvision" 2> /dev/null; then
    run_step "pool benchmark (vs RoIAlign)" 90 "$PYTHON" benchmarks/bench_deform_roi_pool.py --device cuda
  else
    log "gpu-check: torchvision is absent: no RoIAlign to compare the pool with (its cost is in the next table)"
  fi
  run_step "deterministic backward cost" 120 "$PYTHON" scripts/gpu_bench_determinism.py
fi
finish
