# make run    set up .venv, build, run the main job (demo + benchmark table)
# make test   set up .venv, build, run the whole test suite
# make build  set-up alone (incremental: ninja recompiles only what changed)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
PYTEST_FLAGS ?= -q -rs

.PHONY: build run test test-gpu bench lint clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace --force

run: build
	$(PY) -m lstm_fused.demo
	$(PY) -m lstm_fused.bench --quick

test: build
	$(PY) -m pytest tests $(PYTEST_FLAGS)

test-gpu: build
	$(PY) -m pytest tests -m cuda $(PYTEST_FLAGS)

bench: build
	$(PY) -m lstm_fused.bench

lint: $(STAMP)
	$(VENV)/bin/ruff check lstm_fused tests benchmarks setup.py

clean:
	rm -rf build lstm_fused/*.so
