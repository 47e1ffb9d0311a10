# Fresh machine: `make setup` then `make demo` / `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU pins measured on the development machines (shared docs ENVIRONMENT.md): torch is pinned
# exactly, because an unpinned torch pulls a multi-GB CUDA build. DeepSpeed installs without CUDA
# (DS_BUILD_OPS=0) and builds its C++ ops on first use, cached in TORCH_EXTENSIONS_DIR.
PINS := torch==2.13.0 omegaconf==2.4.0 webdataset==1.0.2
# triton for a CPU torch (its interpreter runs the Triton kernel tests), pinned here and not in
# setup.py: a CUDA torch brings the triton it was built with (3.7.1 for 2.13.0), which must stay
CPU_TRITON := triton==3.9.0

.PHONY: setup demo test test-slow test-slurm test-gpu-static gpu-acceptance-dry-run test-all lint clean

setup: $(BIN)/ddrl

$(BIN)/ddrl: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(PINS)
	if $(BIN)/python -c 'import torch; raise SystemExit(torch.version.cuda is not None)'; then \
	  $(BIN)/pip install --quiet $(CPU_TRITON); fi
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e '.[dev,deepspeed,megatron,telemetry,video,triton,diffusers,logging]'
	touch $@

demo: setup
	$(BIN)/ddrl demo

test: setup
	$(BIN)/python -m pytest -q -m "not slow and not slurm and not gpu_static"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# a real 2-node SLURM on this machine (root; installs Debian's slurm and munge packages)
test-slurm: setup
	$(BIN)/python -m pytest -q -m slurm

# GPU checks without a GPU (README, "GPU install"): the GPU install resolves, the Triton kernels and
# the CUDA extension compile for sm_80/sm_90; needs PyPI, downloads cached in .cache/gpu_static
test-gpu-static: setup
	$(BIN)/python -m pytest -q -s -m gpu_static tests/test_gpu_static.py

# what benchmarks/gpu_acceptance.sh would run on a GPU machine, and its prerequisites
gpu-acceptance-dry-run:
	bash benchmarks/gpu_acceptance.sh --dry-run

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check ddrl_scale kernels tests benchmarks setup.py

clean:
	rm -rf outputs .pytest_cache
