"""`ddrl env`: what this machine offers a run, for bug reports and for the infra team's first question.

Reads the installed versions (torch, CUDA, NCCL, cuDNN, triton, flash-attn, deepspeed, megatron-core
and the other optional extras), the GPUs as torch and NVML see them (memory, NVLink), the CPU's
model and the instruction sets the CPU paths care about (AVX-512 BF16, AMX, from /proc/cpuinfo),
the SLURM and launcher variables of the environment, and which attention and loss-kernel backends a
run with the given config would get and why (asked of train/host_checks.py, which asks the modules
that choose). Nothing is built or started; a missing piece reads "not installed" or "none".
`--json` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "triton", "flash-attn", "deepspeed", "megatron-core", "nvidia-ml-py", "diffusers",
            "transformers", "accelerate", "av", "psutil", "tensorboard", "wandb")
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TRITON_INTERPRET", "TORCH_EXTENSIONS_DIR",
                    "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "TORCHELASTIC_RUN_ID")
NONE, NOT_INSTALLED = "none", "not installed"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    return versions


def cuda_stack() -> dict[str, Any]:
    """torch's CUDA build and the libraries it was built with; the GPUs it can see."""
    import torch
    import torch.distributed as dist

    built = torch.version.cuda
    info: dict[str, Any] = {"torch_cuda": built or f"{NONE} (a CPU-only torch build)"}
    info["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else NONE
    nccl = NONE
    if dist.is_available() and dist.is_nccl_available():
        with contextlib.suppress(Exception):  # the NCCL library may be absent at run time
            version = torch.cuda.nccl.version()  # (major, minor, patch[, suffix]); an int on old torch
            nccl = ".".join(str(part) for part in version) if isinstance(version, tuple) else str(version)
    info["nccl"] = nccl
    info["distributed_backends"] = [name for name, check in (("nccl", "is_nccl_available"),
                                                             ("gloo", "is_gloo_available"),
                                                             ("mpi", "is_mpi_available"))
                                    if dist.is_available() and getattr(dist, check)()] or NONE
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"index": index, "name": props.name,
                         "memory_gb": round(props.total_memory / 1e9, 1),
                         "compute_capability": f"{props.major}.{props.minor}"})
    info["gpus"] = gpus or NONE
    return info


def nvml_report(nvml: Any | None = None) -> dict[str, Any]:
    """The driver and every GPU as NVML sees them (NVML ignores CUDA_VISIBLE_DEVICES), with the
    number of active NVLink links; `nvml`: a stand-in module with pynvml's interface (tests)."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return {"status": f"{NOT_INSTALLED} (nvidia-ml-py, the 'telemetry' extra)", "gpus": NONE}
    try:
        nvml.nvmlInit()
    except Exception as error:  # no driver, no library: NVML is there but cannot answer
        return {"status": f"not usable ({type(error).__name__}: {error})", "gpus": NONE}
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        gpus = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append({"index": index, "name": _text(nvml.nvmlDeviceGetName(handle)),
                         "memory_gb": round(nvml.nvmlDeviceGetMemoryInfo(handle).total / 1e9, 1),
                         "nvlink_active_links": _nvlink_links(nvml, handle)})
        return {"status": f"driver {_text(driver)}", "gpus": gpus or NONE}
    finally:
        nvml.nvmlShutdown()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvlink_links(nvml: Any, handle: Any) -> int | str:
    active = 0
    for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
        try:
            active += int(nvml.nvmlDeviceGetNvLinkState(handle, link) == 1)
        except Exception:  # NotSupported past the last link, or on a GPU without NVLink
            break
    return active if active else f"{NONE} (PCIe only, or NVLink not reported)"


def cpu_report(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU model, its logical cores, torch's vector capability and the ISA flags that decide the
    CPU paths' speed (bf16 matmuls need AVX-512 BF16 or AMX to be fast)."""
    import torch

    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    model, flags = None, set()
    for line in cpuinfo.splitlines():  # the first processor's lines: the others repeat them
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    model = model or platform.processor() or NONE
    return {"model": model, "logical_cores": os.cpu_count(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "isa": {flag: ("yes" if flag in flags else "no") for flag in ISA_FLAGS}
            if flags else f"{NONE} (no /proc/cpuinfo flags)"}


def environment_variables(environ: dict[str, str] | None = None) -> dict[str, Any]:
    environ = dict(os.environ if environ is None else environ)
    slurm = {key: value for key, value in sorted(environ.items()) if key.startswith("SLURM_")}
    launch = {key: environ[key] for key in LAUNCH_VARIABLES if key in environ}
    return {"slurm": slurm or NONE, "launch": launch or NONE}


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """The choosers log their choice (and a fallback as a warning) for a run's log; here the report
    says it, once."""
    package = logging.getLogger("ddrl_scale")
    level, package.level = package.level, logging.ERROR
    try:
        yield
    finally:
        package.setLevel(level)


def backend_report(config: Any) -> dict[str, Any]:
    """Which device, attention and loss-kernel backends a run of `config` gets here, and why."""
    import torch

    from ddrl_scale.train import host_checks

    run = config.run
    try:
        device = host_checks.run_device(run.device)
    except host_checks.HostCapabilityError as error:
        return {"device": f"{NONE}: {error}", "attention": NONE, "kernels": NONE}
    dtype = torch.bfloat16 if run.dtype == "bf16" else torch.float32
    report: dict[str, Any] = {"device": f"{device} (run.device={run.device}, run.dtype={run.dtype})"}
    with _quiet_logs():
        requested = config.model.attention_backend
        try:
            chosen, why = host_checks.attention_choice(requested, device, dtype)
            report["attention"] = {"requested": requested, "chosen": chosen, "why": why}
        except host_checks.HostCapabilityError as error:
            report["attention"] = {"requested": requested, "chosen": NONE, "why": str(error)}
        # the CUDA extension is built only where it could run, and building takes a minute
        problems = host_checks.kernel_problems(device.type, build_cuda=False)
        requested = config.kernels.backend
        if requested == "cuda" and device.type == "cuda":
            chosen = "cuda (if the extension builds: `ddrl env` does not build it)"
        else:
            try:
                chosen = host_checks.kernel_choice(requested, device)
            except host_checks.HostCapabilityError as error:
                chosen = f"{NONE}: {error}"
        report["kernels"] = {"requested": requested, "chosen": chosen,
                             "backends": {name: problem or "available" for name, problem in problems.items()}}
    return report


def collect(config: Any, source: str | None = None) -> dict[str, Any]:
    """Every field of the report; `source`: the YAML file `config` came from (None: the defaults)."""
    from ddrl_scale import __version__

    return {"ddrl_scale": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": package_versions(), "cuda": cuda_stack(), "nvml": nvml_report(), "cpu": cpu_report(),
            **environment_variables(), "backends": backend_report(config),
            "config": source or "the defaults (no --config)"}


def render(report: dict[str, Any]) -> str:
    """Indented `key: value` lines; lists of GPUs one per line."""
    lines: list[str] = []

    def walk(value: Any, key: str, depth: int) -> None:
        pad = "  " * depth
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            for inner, item in value.items():
                walk(item, str(inner), depth + 1)
        elif isinstance(value, list):
            lines.append(f"{pad}{key}:")
            for item in value:
                text = ", ".join(f"{k} {v}" for k, v in item.items()) if isinstance(item, dict) else item
                lines.append(f"{pad}  - {text}")
        else:
            lines.append(f"{pad}{key}: {value}")

    for key, value in report.items():
        walk(value, key, 0)
    return "\n".join(lines)


def cmd_env(args: argparse.Namespace) -> None:
    from ddrl_scale.config import load_config

    report = collect(load_config(args.config, args.overrides), args.config)
    print(json.dumps(report, indent=2) if args.json else render(report))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`ddrl env` under the main command line's subparsers."""
    parser = subparsers.add_parser(
        "env", help="versions, GPUs, CPU, SLURM variables and the backends a run would get",
        description="Print what this machine offers a run: torch/CUDA/NCCL/cuDNN and the optional "
                    "packages, GPUs (memory, NVLink, NVML), CPU model and ISA, SLURM and launcher "
                    "variables, and the attention and loss-kernel backends a run of the config would "
                    "get, with the reason. Attach `ddrl env --json` to bug reports.")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.add_argument("--config", default=None, help="YAML config whose backends to explain "
                                                       "(default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (run.device=cuda)")
    parser.set_defaults(handler=cmd_env)
    return parser
