# make run    set up .venv, build, run the main job (demo + benchmark table)
# make test   set up .venv, build, run the whole test suite
# make build  set-up alone: an editable install into .venv (incremental: ninja recompiles only
#             what changed), so `import lstm_fused` works from any directory with .venv's python
# make test-quick  the suite without the tests marked slow (the edit loop)
# make test-gpu  the CUDA suite (skipped, with the reason, where no GPU is present)
# make gpu-check OUT=dir  on a GPU host, with ITS python3 and torch (no .venv): build for its GPU,
#                the CUDA suite, compute-sanitizer, the GPU benchmark, in < 8 min; dir/summary.md
# make test-asan the core tests and a kernel stress under ASan + UBSan (own CPU-only build)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
PYTEST_FLAGS ?= -q -rs
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: build run test test-quick test-gpu gpu-check bench lint clean

# Development builds compile the CUDA kernels for A100 and H100 only (PTX for newer GPUs), to keep
# build time down; setup.py's default without a list covers Turing through Blackwell.
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export TORCH_CUDA_ARCH_LIST
OUT ?= results/gpu-check

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt
	touch $(STAMP)

# --no-build-isolation: build against the torch in .venv (the one the extension will run with).
build: $(STAMP)
	$(PIP) install -q --no-build-isolation --no-deps -e .

run: build
	$(PY) examples/demo.py
	$(PY) benchmarks/bench.py --quick

test: build
	$(PY) -m pytest tests $(PYTEST_FLAGS)

test-quick: build
	$(PY) -m pytest tests -m "not slow" $(PYTEST_FLAGS)

# The CUDA suite; without a GPU every test is reported as skipped, with the reason (exit 0).
test-gpu: build
	$(PY) -m pytest tests -m cuda $(PYTEST_FLAGS)

# The GPU kit (benchmarks/gpu_check.py): no GPU here writes "no GPU" into $(OUT)/summary.md, exit 0.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out $(OUT)

# ASan + UBSan build of the CPU operators in build/asan/ (the in-place build is untouched), then
# tests/test_layer.py, test_cell.py, test_reliability.py and tests/asan/stress.py against it.
.PHONY: test-asan
test-asan: $(STAMP)
	PY=$(abspath $(PY)) tests/asan/run_asan.sh

bench: build
	$(PY) benchmarks/bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build lstm_fused/*.so *.egg-info
