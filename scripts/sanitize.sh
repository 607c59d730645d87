#!/usr/bin/env bash
# make sanitize: the CPU kernels and the host-run CUDA kernels built with AddressSanitizer and
# UndefinedBehaviorSanitizer (float-cast-overflow included: a NaN or huge float converted to an
# integer), and the op tests run under them. Any finding stops the run with a report.
#
#   1. the extension, CPU-only, with the sanitizers (scripts/build_extension.py --sanitize) into
#      build/sanitize/, next to a copy of the Python package, build/sanitize/pkg/mmdet_dcnv2;
#   2. the host-run library with the sanitizers (tests/hostcuda.py, MMDET_DCNV2_SANITIZE=1);
#   3. pytest on the op tests (and the CPU routes' tests: the fused forward's tails) with the ASan
#      runtime preloaded (Python itself is not instrumented).
#
# PYTHON defaults to .venv/bin/python (make's environment); PYTEST_ARGS are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export MAX_JOBS=${MAX_JOBS:-2}
start=$(date +%s)

ASAN_RUNTIME=$(${CXX:-c++} -print-file-name=libasan.so)
test -f "$ASAN_RUNTIME" || { echo "sanitize: no libasan.so found for ${CXX:-c++}" >&2; exit 1; }
# libstdc++ preloaded right after it: ASan's __cxa_throw interceptor needs the real one at start-up,
# or the first C++ exception of a library linked against its own copy (triton's) aborts the process.
PRELOAD="$ASAN_RUNTIME $(${CXX:-c++} -print-file-name=libstdc++.so.6)"
# Leaks are CPython's and torch's (interned objects, caches), not ours: leak checking is off.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:detect_odr_violation=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

rm -rf build/sanitize/pkg
mkdir -p build/sanitize/pkg
cp -r mmdet_dcnv2 build/sanitize/pkg/
find build/sanitize/pkg -name '*.so' -delete
# The builder loads what it built, so it runs with the ASan runtime preloaded too.
MMDET_DCNV2_WITH_CUDA=0 LD_PRELOAD="$PRELOAD" "$PYTHON" scripts/build_extension.py --sanitize \
  --build-dir build/sanitize/ext --target build/sanitize/pkg/mmdet_dcnv2/_C.so
built=$(date +%s)
export MMDET_DCNV2_SANITIZE=1
# The sanitized package first; tests/ for the helpers (as pytest's pythonpath setting does).
export PYTHONPATH="$PWD/build/sanitize/pkg:$PWD/tests"
# torch.compile tests are left out: inductor compiles and loads its own C++ under the preloaded runtime.
LD_PRELOAD="$PRELOAD" "$PYTHON" -P -m pytest -q -p no:cacheprovider -k "not torch_compile" \
  tests/test_modulated_deform_conv.py tests/test_cpu_gemm_route.py tests/test_deform_roi_pool.py tests/test_cuda_host.py \
  ${PYTEST_ARGS:-}
echo "sanitize: passed; build $((built - start)) s, tests (including the host-run build) $(( $(date +%s) - built )) s"
