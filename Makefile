# Everything a fresh machine needs is installed here; `make test` and `make demo` work on a new clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is installed first, from TORCH_INDEX when set, so the build is chosen, not whatever the
# index offers: CI on CPU: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# a CUDA machine:        make install TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install test demo bench mutate mutate-module clean

# [ray]: tests/test_ray.py runs Ray batch jobs on a local cluster (ray[data]: ~60 s, ~505 MB to install).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[test,nvml,quant,ray]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m autofit.demo --out demo.png

bench: install
	$(PY) benchmarks/overhead.py

# Mutation testing of the decision modules (docs/testing.md), outside `make test`: first the hand-made
# mutants of issue 26 (a few minutes), then mutmut on each decision module with that module's own
# selection of tests, in a scratch copy (benchmarks/mutmut_module.py), ending with the table of scores
# of docs/testing.md. One OpenMP thread: torch's spinning threads would starve the parallel workers.
# `make mutate MODULE=cache` runs one module; `make mutate-module MODULE=cache` skips the hand-made mutants.
MODULE ?= all
mutate: install
	$(PY) -m pip install --quiet -e ".[test,mutate]"
	OMP_NUM_THREADS=1 $(PY) benchmarks/mutate.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/mutmut_module.py $(MODULE)

mutate-module: install
	$(PY) -m pip install --quiet -e ".[test,mutate]"
	OMP_NUM_THREADS=1 $(PY) benchmarks/mutmut_module.py $(MODULE)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache demo.png demo.plan.json mutants
