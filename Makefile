# Every target installs what it needs first, so each works on a fresh clone.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch used where no NVIDIA GPU is present (a GPU box keeps its own CUDA torch).
TORCH_CPU_VERSION ?= 2.13.0

.PHONY: install install-torch test test-seeds test-triton-compat demo bench bench-pytest clean

install-torch:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install "torch>=2.6"; \
	else \
		$(PIP) install "torch==$(TORCH_CPU_VERSION)"; \
	fi

# --no-build-isolation: the extension must compile against the torch installed above.
install: install-torch
	$(PIP) install "setuptools>=64" wheel ninja numpy
	$(PIP) install --no-build-isolation -e ".[test,bench,train]"

test: install
	$(PYTHON) -m pytest tests

# Every test that draws a random seed (the `rng` fixture), over SEEDS seeds derived from
# SEED_BASE (a fresh one, printed, unless given), in parallel; ends with a summary and one replay
# command per failure. Not part of `make test`. Narrow it with SEED_ARGS, e.g.
#   make test-seeds SEEDS=50 SEED_ARGS="tests/test_models.py"
SEEDS ?= 200
SEED_BASE ?= $(shell $(PYTHON) -c "import os; print(int.from_bytes(os.urandom(4), 'little'))")
SEED_WORKERS ?= auto
SEED_ARGS ?= tests
test-seeds: install
	$(PYTHON) -m pytest -q -p no:cacheprovider -n $(SEED_WORKERS) --seed-sweep $(SEEDS) \
		--seed-base $(SEED_BASE) $(SEED_ARGS)

# The GPU box runs triton 3.6, not ours: the interpreter tests and the sm_90/sm_80 compile checks
# again under triton 3.6 (a venv over the installed packages; its interpreter needs numpy < 2.4).
TRITON_COMPAT_VERSION ?= 3.6.0
TRITON_COMPAT_VENV ?= build/triton-$(TRITON_COMPAT_VERSION)
test-triton-compat: install
	$(PYTHON) -m venv --system-site-packages $(TRITON_COMPAT_VENV)
	$(TRITON_COMPAT_VENV)/bin/python -m pip install -q "triton==$(TRITON_COMPAT_VERSION)" "numpy<2.4"
	TRITON_INTERPRET=1 $(TRITON_COMPAT_VENV)/bin/python -m pytest -p no:cacheprovider \
		tests/test_triton_kernels.py tests/test_tuning.py tests/test_triton_compile.py

demo: install
	$(PYTHON) -m transmatcher_fast.cli demo

bench: install
	$(PYTHON) benchmarks/bench_cpu.py
	$(PYTHON) benchmarks/bench_matcher.py

# The op's speed from commit to commit (pytest-benchmark; each run saved under .benchmarks/).
# Compare with the previous run, failing on a regression:
#   make bench-pytest BENCH_ARGS="--benchmark-compare --benchmark-compare-fail=median:15%"
BENCH_ARGS ?=
bench-pytest: install
	$(PYTHON) -m pytest benchmarks/test_bench_op.py --benchmark-autosave \
		--benchmark-max-time=0.5 --benchmark-min-rounds=3 $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info transmatcher_fast/_C*.so .pytest_cache
