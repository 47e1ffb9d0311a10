# GPU image: NGC PyTorch brings CUDA torch, NCCL and the toolchain; the package goes on top.
# The cluster recipe (flash-attn, DeepSpeed and Megatron extras, entry point) is completed with
# the sharded trainer; no Docker engine runs on the development machines, so this is not built in CI.
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /opt/ddrl-scale
COPY setup.py README.md ./
COPY ddrl_scale ./ddrl_scale
COPY kernels ./kernels
COPY configs ./configs
# --no-deps keeps the image's CUDA torch: the CPU pin in setup.py is for the development machines
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir omegaconf==2.4.0 webdataset==1.0.2 safetensors tqdm pillow matplotlib

ENTRYPOINT ["ddrl"]
