# Two commands: `make demo` (install + run the embedded-default demo) and `make test` (install + whole suite).
# `make test-quick` skips tests marked slow, for iteration. CI runs `make test` (see .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medvlsam2-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-quick lint lint-check clean

install: $(STAMP)

# CPU torch first (a newer pin or plain `torch` would fetch a multi-GB CUDA build), then the package,
# then sam2 without its dependencies and without build isolation (its torchvision pin pulls CUDA torch).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q torch==2.13.0 -e ".[test]"
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-deps --no-build-isolation sam2==1.1.0
	touch $(STAMP)

demo: install
	$(VENV)/bin/medvlsam2 demo

test: install lint-check
	$(PY) -m pytest

lint-check: install
	$(VENV)/bin/ruff check MedVLSAM2Lib MedVLSAM2 Testing examples Screenshots
	$(VENV)/bin/ruff format --check MedVLSAM2Lib MedVLSAM2 Testing examples Screenshots

test-quick: install lint-check
	$(PY) -m pytest -m "not slow" -x -q

lint: install
	$(VENV)/bin/ruff check --fix MedVLSAM2Lib MedVLSAM2 Testing examples Screenshots
	$(VENV)/bin/ruff format MedVLSAM2Lib MedVLSAM2 Testing examples Screenshots

clean:
	rm -rf $(VENV) demo-output .pytest_cache
