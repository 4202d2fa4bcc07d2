# One-command entry points. `make demo` and `make test` each set up a fresh machine first.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, on its own, so that the build is chosen here and not by the package's resolver:
# - where a torch wheel is already available locally (this project's machines carry the CPU build in pip's
#   find-links), `make setup` downloads nothing large;
# - on a stock Linux x86-64 machine, pip's default index serves the CUDA build of torch, which pulls several GB of
#   nvidia-* wheels. For a CPU-only build say TORCH_INDEX=https://download.pytorch.org/whl/cpu; for a given CUDA
#   build, the matching index (e.g. .../whl/cu126) or TORCH_SPEC="torch==2.13.0+cu126" with that index.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-browser test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/sparsedecomp demo --out demo-out

test: setup
	$(PY) -m pytest -m "not slow and not gpu and not network and not browser" $(PYTEST_ARGS)

# The pages in headless Chromium (tests/test_pages_browser.py); they skip without a browser, fail so under CI=true.
test-browser: setup
	$(PY) -m pytest -m browser $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The solver benchmarks: the acceptance sizes, then issue 10's regime table (demo world, z and mixed space,
# alpha 1-20 % of alpha_max, NNLS) against scikit-learn, celer and skglm (the bench extra) and scipy, in one process.
bench: setup
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) -m benchmarks.solvers
	$(PY) -m benchmarks.solver_regimes --n-targets 128 --n-ref 16

clean:
	rm -rf $(VENV) demo-out benchmarks/results
