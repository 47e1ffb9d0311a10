"""Can this host run what the config asks for? Device, attention backend, loss kernels, engine package.

Runs before the expensive part of a command (`ddrl train`, `ddrl demo`, `ddrl pretrain`): after the
config is validated and before a process group, a model or data exists. A device or backend that is
not there is the user's setting, not a bug, so it is a `HostCapabilityError`: the CLI prints its one
line and exits 2. The choices themselves are made by their own modules (kernels/dispatch.py,
models/attention.py); this module only asks them early, and `ddrl env` (telemetry/env_report.py)
asks the same questions to explain what a run would get.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ddrl_scale.config import RunConfig

ENGINE_PACKAGES = {"deepspeed": ("deepspeed", "deepspeed"), "megatron": ("megatron.core", "megatron")}


class HostCapabilityError(RuntimeError):
    """The config asks for a device, backend or package this host lacks; the message names the key."""


def run_device(device_request: str, local_rank: int = 0) -> torch.device:
    """The device a run with run.device=`device_request` gets on this rank (as parallel.init_world
    picks it), or HostCapabilityError when there is no such device here."""
    use_cuda = device_request == "cuda" or (device_request == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"a CUDA build (CUDA {torch.version.cuda})" if torch.version.cuda else "a CPU-only build"
        raise HostCapabilityError(
            f"run.device=cuda, but torch {torch.__version__} ({build}) sees no CUDA device"
            f"{_visible_devices_note()}; use run.device=cpu or auto (`ddrl env` shows what is there)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise HostCapabilityError(
            f"run.device=cuda: local rank {local_rank} needs GPU {local_rank}, but this node has "
            f"{count} visible GPU{'s' * (count != 1)}; start at most {count} processes per node "
            f"(launch.nproc_per_node, or --nproc of `ddrl launch local`)")
    return torch.device("cuda", local_rank)


def _visible_devices_note() -> str:
    setting = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if setting is None else f" (CUDA_VISIBLE_DEVICES={setting!r})"


def attention_choice(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(backend, why) that models/attention.py picks for `requested` on activations of `dtype` on
    `device`. Raises HostCapabilityError when `requested` is flash and flash cannot run here."""
    from ddrl_scale.models.attention import resolve_backend

    try:
        choice = resolve_backend(requested, device, dtype)
    except RuntimeError as error:
        raise HostCapabilityError(str(error)) from None
    if choice == "flash":
        return choice, f"flash-attn runs {dtype} activations on {device.type}"
    if requested == "sdpa":
        return choice, "requested"
    try:  # what keeps flash away, in attention.py's own words
        resolve_backend("flash", device, dtype)
    except RuntimeError as error:
        return choice, f"flash is not usable: {str(error).split(';')[0]}"
    return choice, "requested"


def kernel_problems(device_type: str, build_cuda: bool = True) -> dict[str, str | None]:
    """Why each loss-kernel backend cannot run on `device_type` tensors (None: it can), from
    kernels/dispatch.py's own checks. Checking the CUDA extension on CUDA tensors builds it (about a
    minute, once); without `build_cuda` it is reported as not checked there."""
    from ddrl_scale.kernels import dispatch

    cuda = dispatch.cuda_problem(device_type) if build_cuda or device_type != "cuda" else \
        "not checked (built on first use with kernels.backend=cuda, about a minute)"
    return {"torch": None, "compile": dispatch.compile_problem(device_type),
            "triton": dispatch.triton_problem(device_type), "cuda": cuda}


def kernel_choice(requested: str, device: torch.device) -> str:
    """The loss-kernel backend for kernels.backend=`requested` on `device` tensors (kernels/dispatch.py
    decides and logs it once); HostCapabilityError when a named backend cannot run here."""
    from ddrl_scale.kernels import BackendUnavailableError, resolve_backend

    try:
        return resolve_backend(requested, device)
    except BackendUnavailableError as error:
        raise HostCapabilityError(str(error)) from None


def check_host(config: RunConfig) -> None:
    """Everything of `config` that this host may lack, checked before any work (HostCapabilityError)."""
    device = run_device(config.run.device, int(os.environ.get("LOCAL_RANK", "0")))
    if config.model.kind == "dit" and config.model.attention_backend == "flash":
        dtype = torch.bfloat16 if config.run.dtype == "bf16" else torch.float32
        attention_choice("flash", device, dtype)
    if config.kernels.backend != "auto":  # auto always finds one; a named one may be missing
        kernel_choice(config.kernels.backend, device)
    engine = config.parallel.engine
    if engine in ENGINE_PACKAGES:
        module, extra = ENGINE_PACKAGES[engine]
        if not _installed(module):
            raise HostCapabilityError(f"parallel.engine={engine} needs the {module.split('.')[0]} "
                                      f"package: pip install -e .[{extra}]")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (megatron for megatron.core)
        return False
