# One-command entry points. `make demo` and `make test` each set up a fresh machine first.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed explicitly first so pip never resolves a multi-GB CUDA build by accident; override with
# TORCH_SPEC="torch" (or a CUDA wheel) on a machine that wants one.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/sparsedecomp demo --out demo-out

test: setup
	$(PY) -m pytest -m "not slow and not gpu and not network and not browser" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.solvers

clean:
	rm -rf $(VENV) demo-out benchmarks/results
