#!/usr/bin/env bash
# The one prepared GPU call (DESIGN.md section 6). Run from anywhere; works in the repo root:
#
#     bash benchmarks/gpu_run.sh                 # writes to $OUT (else benchmarks/results)
#     bash benchmarks/gpu_run.sh --dry-run       # the plan, no build, no GPU section
#
# benchmarks/gpu_suite.py prints its plan first (every section's estimate from counts made on
# the CPU, then `plan: T s of D s`), builds the extension in place (python setup.py build_ext
# --inplace, CUDA for sm_90a; the source tree on PYTHONPATH, nothing installed; without the
# extension if that fails), then measures in a fresh interpreter with a global deadline. The
# JSON and log are saved after every section and a summary table is printed last. Extra
# arguments go to gpu_suite.py (--quick, --skip a,b, --only a,b, --order-variants, ...).
#
# Environment: OUT (output folder), GPU_RUN_DEADLINE (seconds for the suite, default 480),
# PYTHON (default python3), TRANSMATCHER_FAST_CUDA_ARCH (default 90a), MAX_JOBS.
# Files in $OUT: gpu_suite_<device>.json/.log/.png, gpu_tuning_<device>.json, ncu_raw.csv,
# ncu_cases.json, ncu_manifest.json, compile/ and transreid/ folders.
set -u
cd "$(dirname "$0")/.." || exit 2

PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-benchmarks/results}"
DEADLINE="${GPU_RUN_DEADLINE:-480}"
mkdir -p "$OUT_DIR" || exit 2

export PYTHONUNBUFFERED=1
export TRANSMATCHER_FAST_CUDA_ARCH="${TRANSMATCHER_FAST_CUDA_ARCH:-90a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"

extra=()
for arg in "$@"; do
    # The dry run replaces the build with a no-op; the fresh interpreter runs as in a real run.
    [ "$arg" = "--dry-run" ] && extra=(--build-cmd true)
done

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_run.sh: $PY not found" >&2
    exit 2
fi

# The suite keeps its own deadline (and a watchdog 30 s past it); this timeout is the backstop.
if command -v timeout >/dev/null 2>&1; then
    timeout -k 15 "$((${DEADLINE%.*} + 75))" \
        "$PY" benchmarks/gpu_suite.py --out "$OUT_DIR" --deadline "$DEADLINE" ${extra[@]+"${extra[@]}"} "$@"
else
    "$PY" benchmarks/gpu_suite.py --out "$OUT_DIR" --deadline "$DEADLINE" ${extra[@]+"${extra[@]}"} "$@"
fi
rc=$?
echo "gpu_run.sh: suite exit code $rc; files in $OUT_DIR:"
ls -la "$OUT_DIR" 2>/dev/null | tail -n +2
exit "$rc"
