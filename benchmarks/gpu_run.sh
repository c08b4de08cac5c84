#!/usr/bin/env bash
# The one prepared GPU call (DESIGN.md section 6). Run from anywhere; works in the repo root:
#
#     bash benchmarks/gpu_run.sh                 # writes to $OUT (else benchmarks/results)
#     bash benchmarks/gpu_run.sh --dry-run       # no build, no GPU section: checks the plumbing
#
# Offline install (pip --no-index --no-build-isolation --no-deps -e ., CUDA for sm_90a only;
# on failure again without the extension), then benchmarks/gpu_suite.py in a fresh interpreter
# with a global deadline: correctness first, then the timings; the JSON and log are saved after
# every section and a summary table is printed last. Extra arguments go to gpu_suite.py.
#
# Environment: OUT (output folder), GPU_RUN_DEADLINE (seconds for the suite, default 480),
# PYTHON (default python3), TRANSMATCHER_FAST_CUDA_ARCH (default 90a).
#
# Expected timeline on an H200 (estimates, cold Triton cache, 16 cores; the suite skips what
# no longer fits): build ~100 s (at most 240, then at most 60 without the extension); start
# ~10; correctness ~90 with tests/test_triton_kernels.py running beside it; ties ~15; NaN ~10;
# 2**31 offset ~20; ceilings ~5; variant sweep 30-150 (what is left minus 100); training ~20-60;
# evaluation ~30-70; Market-size matching ~150 only if that much is left. The suite ends by
# the deadline (a watchdog saves and exits 30 s after it); this script's timeout is the backstop.
# Files in $OUT: gpu_suite_<device>.json/.log/.png, gpu_tuning_<device>.json, market/ (<= 6).
set -u
cd "$(dirname "$0")/.." || exit 2

PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-benchmarks/results}"
DEADLINE="${GPU_RUN_DEADLINE:-480}"
mkdir -p "$OUT_DIR" || exit 2

export PYTHONUNBUFFERED=1
export TRANSMATCHER_FAST_CUDA_ARCH="${TRANSMATCHER_FAST_CUDA_ARCH:-90a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"

dry=0
for arg in "$@"; do
    [ "$arg" = "--dry-run" ] && dry=1
done

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_run.sh: $PY not found" >&2
    exit 2
fi
# What the suite needs (torch, triton, numpy) and what is optional (the rest), said up front.
"$PY" - <<'EOF'
import importlib.util, sys
need = ["torch", "triton", "numpy"]
optional = ["matplotlib", "pytest", "tqdm", "yaml", "PIL", "setuptools", "ninja"]
have = {name: importlib.util.find_spec(name) is not None for name in need + optional}
print("gpu_run.sh: python", sys.version.split()[0], sys.executable)
print("gpu_run.sh: modules:", " ".join(f"{k}={'yes' if v else 'NO'}" for k, v in have.items()))
EOF
command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 1
command -v nvidia-smi >/dev/null 2>&1 && timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

extra=()
if [ "$dry" = 1 ]; then
    # No real build: a no-op install command, then the fresh interpreter as in a real run.
    extra+=(--build-cmd true)
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
