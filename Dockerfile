# GPU image for ddrl-scale: NGC PyTorch (CUDA torch, NCCL, triton, compilers) with the package and
# all its extras on top, flash-attn built against the image's torch. Entry point: `ddrl`.
#   docker build -t ddrl-scale .
#   docker run --gpus all --ipc=host -v /data:/data ddrl-scale train /data/run.yaml
# No Docker engine runs on the development machines: tests/test_dockerfile.py checks that every
# path copied exists in the build context and lints this file with hadolint.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DS_BUILD_OPS=0 \
    MAX_JOBS=8
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/ddrl-scale

COPY setup.py README.md ./
COPY ddrl_scale ./ddrl_scale
COPY kernels ./kernels
COPY launchers ./launchers
COPY configs ./configs

# 1. the package without dependencies: setup.py pins the CPU torch of the development machines, and
#    the image's CUDA torch (and the triton built for it) must stay;
# 2. every extra's requirements but torch, triton and flash-attn, read from the installed metadata
#    so that this list cannot drift from setup.py (DeepSpeed ops are built on first use: DS_BUILD_OPS=0);
# 3. flash-attn compiled against the image's torch (no build isolation).
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import importlib.metadata as m, re; \
reqs = {r.split(';')[0].strip() for r in m.requires('ddrl-scale') or []}; \
name = lambda r: re.split(r'[<>=!~\[ ]', r, maxsplit=1)[0].lower(); \
print('\n'.join(sorted(r for r in reqs if name(r) not in ('torch', 'triton', 'flash-attn', 'flash_attn'))))" \
    > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && pip install --no-cache-dir --no-build-isolation "flash-attn>=2.6,<3" \
 && python -c "import ddrl_scale, flash_attn, torch; print('ddrl-scale on torch', torch.__version__)" \
 && rm /tmp/requirements.txt

ENTRYPOINT ["ddrl"]
CMD ["--help"]
