# vitkern: `make demo` and `make test` work on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.vitkern-installed
# CI and the quick start skip the CUDA extension build at install time; tests/test_cuda_build.py
# compiles csrc/ for sm_80 and sm_90a itself (cached), and `make gpu` builds it just in time.
export VITKERN_SKIP_CUDA_BUILD ?= 1
OUT ?=

.PHONY: demo test bench gpu audit clean

$(STAMP): pyproject.toml setup.py
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q "torch>=2.6,<=2.14.1"
	$(VPY) -m pip install -q --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m vitkern.demo

test: $(STAMP)
	$(VPY) -m pytest -q tests benchmarks --benchmark-disable-gc

bench: $(STAMP)
	$(VPY) -m pytest benchmarks/ --benchmark-only
	$(VPY) -m vitkern.bench

audit: $(STAMP)
	$(VPY) -m vitkern.audit

# The GPU suite: the GPU machine's system python3 (torch, triton, timm, ... preinstalled), no venv.
gpu:
	python3 -m pytest -q -m gpu tests $(if $(OUT),--junitxml=$(OUT)/gpu-tests.xml,)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
