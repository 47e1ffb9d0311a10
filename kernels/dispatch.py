"""Backend choice for the fused loss kernels (`kernels.backend: auto | torch | compile | triton | cuda`).

Part of the policy loss + data loss stage of docs/architecture.md: the trainer names a backend once,
each op resolves it against the device of its tensors here. `auto` picks Triton on CUDA tensors and the
`torch.compile`d fused path on CPU; the resolved choice is logged once per (name, device type).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "compile", "triton", "cuda")

# (requested name, device type) -> resolved backend; filled on first success so that later calls (and
# calls traced by torch.compile) are a dictionary lookup.
_RESOLVED: dict[tuple[str, str], str] = {}


class BackendUnavailableError(RuntimeError):
    """The requested kernel backend cannot run here; the message says what is missing."""


def triton_problem(device_type: str) -> str | None:
    """Why Triton kernels cannot run on `device_type` tensors here, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton==3.9.0, the 'triton' extra of setup.py)"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    if device_type != "cpu":
        return f"Triton kernels run on CUDA tensors (and on CPU through the interpreter), not {device_type}"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ("Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported (tests and debugging only)")
    language = sys.modules.get("triton.language")
    if language is not None:
        # triton builds its own library functions (tl.sum, ...) for the interpreter only when the
        # variable was set at import time; afterwards setting it is not enough.
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(language.standard.sum, InterpretedFunction):
            return ("triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot "
                    "run; set the variable before anything imports triton (torch.compile does)")
    return None


def compile_problem(device_type: str) -> str | None:
    """Why the torch.compile fused path cannot run on `device_type` tensors, or None when it can."""
    if device_type == "cpu":
        compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if not any(name and shutil.which(name) for name in compilers):
            return "torch.compile on CPU needs a C++ compiler (g++ or clang++, or $CXX) on the PATH"
        return None
    if device_type == "cuda":
        # inductor generates Triton code for CUDA tensors
        return triton_problem("cuda")
    return None


def cuda_problem(device_type: str) -> str | None:
    """Why the CUDA C++ extension cannot run on `device_type` tensors, or None when it can.

    Building the extension (first use, about a minute, cached by torch in TORCH_EXTENSIONS_DIR) happens
    here, so that a missing nvcc or a compile error surfaces at resolution time, not mid-step.
    """
    if device_type != "cuda":
        return f"the CUDA C++ kernels need CUDA tensors, got {device_type} tensors"
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "the CUDA C++ kernels need a CUDA build of torch and a visible GPU"
    from ddrl_scale.kernels import cuda_extension

    return cuda_extension.load_problem()


def _problem(name: str, device_type: str) -> str | None:
    if name == "torch":
        return None
    if name == "compile":
        return compile_problem(device_type)
    if name == "triton":
        return triton_problem(device_type)
    return cuda_problem(device_type)


def _auto(device_type: str) -> str:
    preferred = {"cuda": "triton", "cpu": "compile"}.get(device_type)
    if preferred is None:
        return "torch"
    reason = _problem(preferred, device_type)
    if reason is not None:
        logger.warning("fused loss kernels: %s unavailable on %s (%s); using the eager torch reference",
                       preferred, device_type, reason)
        return "torch"
    return preferred


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend that runs for `name` on tensors of `device`: one of torch, compile, triton, cuda.

    Raises ValueError for a name outside BACKENDS and BackendUnavailableError, saying what is
    missing, when an explicitly named backend cannot run here. The choice is logged once.
    """
    device_type = torch.device(device).type
    key = (name, device_type)
    chosen = _RESOLVED.get(key)
    if chosen is not None:
        return chosen
    if name not in BACKENDS:
        raise ValueError(f"kernels.backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "auto":
        chosen = _auto(device_type)
    else:
        reason = _problem(name, device_type)
        if reason is not None:
            raise BackendUnavailableError(f"kernels.backend={name!r} cannot run on {device_type} tensors: "
                                          f"{reason}")
        chosen = name
    _RESOLVED[key] = chosen
    # the ops are then called with the resolved name: a lookup, not a second check and log line
    _RESOLVED.setdefault((chosen, device_type), chosen)
    logger.info("fused loss kernels: backend %r on %s tensors -> %s", name, device_type, chosen)
    return chosen


def forget_resolutions() -> None:
    """Drop the cached choices (tests that change the environment between resolutions)."""
    _RESOLVED.clear()
