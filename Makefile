# make run    set up .venv, build, run the main job (demo + benchmark table)
# make test   set up .venv, build, run the whole test suite
# make build  set-up alone (incremental: ninja recompiles only what changed)
# make test-gpu  the CUDA suite (skipped, with the reason, where no GPU is present)
# make gpu-check OUT=dir  on a GPU host, with ITS python3 and torch (no .venv): build for its GPU,
#                the CUDA suite, compute-sanitizer, the GPU benchmark, in < 8 min; dir/summary.md
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
PYTEST_FLAGS ?= -q -rs
# Development builds compile the CUDA kernels for A100 and H100 only (PTX for newer GPUs), to keep
# build time down; setup.py's default without a list covers Turing through Blackwell.
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export TORCH_CUDA_ARCH_LIST
OUT ?= results/gpu-check

.PHONY: build run test test-gpu gpu-check ptxas bench lint clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace --force

run: build
	PYTHONPATH=$(CURDIR) $(PY) examples/demo.py
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/bench.py --quick

test: build
	$(PY) -m pytest tests $(PYTEST_FLAGS)

# The CUDA suite; without a GPU every test is reported as skipped, with the reason (exit 0).
test-gpu: build
	$(PY) -m pytest tests -m cuda $(PYTEST_FLAGS)

# The GPU kit (benchmarks/gpu_check.py): no GPU here writes "no GPU" into $(OUT)/summary.md, exit 0.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out $(OUT)

# Re-record ptxas's register/spill report of the CUDA kernels (docs/ptxas/, ~20 s, no GPU needed).
ptxas: $(STAMP)
	$(PY) benchmarks/ptxas_usage.py

bench: build
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check lstm_fused tests benchmarks setup.py

clean:
	rm -rf build lstm_fused/*.so
