# make run    set up .venv, build, run the main job (demo + benchmark table)
# make test   set up .venv, build, run the whole test suite
# make build  set-up alone (incremental: ninja recompiles only what changed)
# make test-gpu  the CUDA suite (skipped, with the reason, where no GPU is present)
# make test-asan the core tests and a kernel stress under ASan + UBSan (own CPU-only build)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
PYTEST_FLAGS ?= -q -rs

.PHONY: build run test test-gpu ptxas bench lint clean

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

# ASan + UBSan build of the CPU operators in build/asan/ (the in-place build is untouched), then
# tests/test_layer.py, test_cell.py, test_reliability.py and tests/asan/stress.py against it.
.PHONY: test-asan
test-asan: $(STAMP)
	PY=$(abspath $(PY)) tests/asan/run_asan.sh

# Re-record ptxas's register/spill report of the CUDA kernels (docs/ptxas/, ~20 s, no GPU needed).
ptxas: $(STAMP)
	$(PY) benchmarks/ptxas_usage.py

bench: build
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check lstm_fused tests benchmarks setup.py

clean:
	rm -rf build lstm_fused/*.so
