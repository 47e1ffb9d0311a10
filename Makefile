# Fresh machine: `make setup` then `make demo` / `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU pins measured on the development machines (shared docs ENVIRONMENT.md): torch is pinned
# exactly, because an unpinned torch pulls a multi-GB CUDA build. DeepSpeed installs without CUDA
# (DS_BUILD_OPS=0) and builds its C++ ops on first use, cached in TORCH_EXTENSIONS_DIR.
PINS := torch==2.13.0 omegaconf==2.4.0 webdataset==1.0.2

.PHONY: setup demo test test-slow test-slurm test-all lint clean

setup: $(BIN)/ddrl

$(BIN)/ddrl: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(PINS)
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e '.[dev,deepspeed,megatron,telemetry,video,triton,diffusers,logging]'
	touch $@

demo: setup
	$(BIN)/ddrl demo

test: setup
	$(BIN)/python -m pytest -q -m "not slow and not slurm"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# a real 2-node SLURM on this machine (root; installs Debian's slurm and munge packages)
test-slurm: setup
	$(BIN)/python -m pytest -q -m slurm

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check ddrl_scale kernels tests benchmarks setup.py

clean:
	rm -rf outputs .pytest_cache
