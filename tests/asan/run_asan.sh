#!/usr/bin/env bash
# make test-asan: builds the CPU operators with AddressSanitizer + UndefinedBehaviorSanitizer
# (LSTM_FUSED_SANITIZE=1, own build directory build/asan/) and runs the core tests and the stress
# (tests/asan/stress.py) against that build. Any memory or UB error fails the run.
#
#   tests/asan/run_asan.sh                  # build + core tests + stress
#   tests/asan/run_asan.sh python ARGS...   # build, then run ARGS under the sanitizers instead
#
# Python itself is not instrumented: the ASan runtime is preloaded. The package is assembled in
# build/asan/pkg (the .py files and the sanitized _C) and the tests run from there, so that this
# _C, not the in-place one of the repository, is the one imported (the plugin checks it).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
OUT="$ROOT/build/asan"
PKG="$OUT/pkg"

cd "$ROOT"
mkdir -p "$OUT"
echo "test-asan: building the sanitized CPU operators in $OUT"
LSTM_FUSED_BUILD=cpu LSTM_FUSED_SANITIZE=1 "$PY" setup.py -q build_ext \
    --build-temp "$OUT/temp" --build-lib "$OUT/lib" >"$OUT/build.log" 2>&1 ||
    { tail -50 "$OUT/build.log"; exit 1; }
rm -rf "$PKG"
mkdir -p "$PKG/lstm_fused"
cp lstm_fused/*.py "$PKG/lstm_fused/"
cp "$OUT"/lib/lstm_fused/_C*.so "$PKG/lstm_fused/"

export LSTM_FUSED_ASAN_PKG="$PKG"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# detect_leaks: CPython and torch keep allocations alive at exit by design.
# new_delete_type_mismatch / alloc_dealloc_mismatch: torch (not instrumented) trips them itself.
# log_path: pytest captures stderr, and an aborting process loses what was captured, so the
# reports go to files, printed below when a step fails.
LOGS="$OUT/sanitizer-log"
rm -f "$LOGS".*
export ASAN_OPTIONS="detect_leaks=0:new_delete_type_mismatch=0:alloc_dealloc_mismatch=0:abort_on_error=1:log_path=$LOGS:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOGS:${UBSAN_OPTIONS:-}"
report() {
    local status=$?
    for log in "$LOGS".*; do
        [ -e "$log" ] && { echo "===== $log"; head -80 "$log"; }
    done
    exit $status
}
trap report EXIT
export PYTHONPATH="$PKG:$ROOT/tests/asan"

cd "$PKG"  # not the repository root: its lstm_fused/ must not be importable from here
if [ $# -gt 0 ]; then
    "$@"
    exit
fi
# Left out, to stay within ~10 minutes: the 120 comparisons of the vanilla variant with
# torch.nn.LSTM and the float64 gradchecks (the same kernels as test_variants_match_reference, with
# many more calls), and the resident-memory test (ASan's quarantine keeps freed memory by design).
"$PY" -m pytest -p asan_plugin -p no:cacheprovider -q -x \
    -k "not vanilla_matches_torch_lstm and not gradcheck and not resident_memory" \
    "$ROOT/tests/test_layer.py" "$ROOT/tests/test_cell.py" "$ROOT/tests/test_reliability.py"
"$PY" -c 'import asan_plugin; asan_plugin.check_sanitized_build()'
"$PY" "$ROOT/tests/asan/stress.py" --threads 2
# The AVX2 build too (float: 8 lanes, double: 4), where the CPU has AVX-512.
ATEN_CPU_CAPABILITY=avx2 "$PY" "$ROOT/tests/asan/stress.py" --threads 2
# Our few-row GEMM kernels and fused forward step (float32), forced, in both builds.
LSTM_FUSED_CPU_GEMM=simd "$PY" "$ROOT/tests/asan/stress.py" --threads 2
LSTM_FUSED_CPU_GEMM=simd ATEN_CPU_CAPABILITY=avx2 "$PY" "$ROOT/tests/asan/stress.py" --threads 2
# A sanitizer report without an abort (e.g. from a thread pytest did not follow) is a failure too.
if compgen -G "$LOGS.*" >/dev/null; then
    echo "test-asan: sanitizer reports found"
    exit 1
fi
