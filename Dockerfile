# GPU image for ddrl-scale: the CUDA 13.0 toolkit (nvcc, for flash-attn and the CUDA extension) with
# the package and all its extras on top, installed with the exact pins of setup.py: on Linux PyPI's
# torch 2.13.0 is the CUDA 13.0 build and brings the triton it requires, so the image runs the torch
# the code is developed and tested on (an NGC PyTorch image ships its own, older, torch build).
# flash-attn is built against that torch. Entry point: `ddrl`.
#   docker build -t ddrl-scale .
#   docker run --gpus all --ipc=host -v /data:/data ddrl-scale train /data/run.yaml
# No Docker engine runs on the development machines: tests/test_dockerfile.py checks that every
# path copied exists in the build context, that the base's CUDA is the torch wheel's, and lints this
# file with hadolint.
ARG BASE_IMAGE=nvcr.io/nvidia/cuda:13.0.0-devel-ubuntu24.04
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DS_BUILD_OPS=0 \
    MAX_JOBS=8 \
    CUDA_HOME=/usr/local/cuda \
    PATH=/opt/venv/bin:${PATH}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# the distribution's Python 3.12 in a virtual environment (Ubuntu 24.04 refuses pip on the system
# Python); build tools for flash-attn and DeepSpeed's ops, which build on first use (DS_BUILD_OPS=0)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git ninja-build \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --no-cache-dir --upgrade "pip>=24" "setuptools>=70" "wheel>=0.43" "packaging>=24"
WORKDIR /opt/ddrl-scale

COPY setup.py README.md ./
COPY ddrl_scale ./ddrl_scale
COPY kernels ./kernels
COPY launchers ./launchers
COPY configs ./configs

# 1. the package with every extra, at setup.py's pins (torch==2.13.0: the CUDA 13.0 wheel here);
# 2. flash-attn compiled against that torch (no build isolation: its build imports torch), by the
#    base's CUDA 13.0 nvcc, which matches the wheel's CUDA as torch's extension builder requires.
# (DL3013: ".[all]" is this package, its versions pinned in setup.py)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[all]" \
 && python -c "import torch; assert torch.version.cuda and torch.version.cuda.startswith('13.'), torch.version.cuda" \
 && pip install --no-cache-dir --no-build-isolation "flash-attn>=2.6,<3" \
 && python -c "import ddrl_scale, flash_attn, torch, triton; print('ddrl-scale on torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"

ENTRYPOINT ["ddrl"]
CMD ["--help"]
