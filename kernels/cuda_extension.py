"""The `cuda` backend: the CUDA C++ kernels of csrc/, built on first use as a torch extension.

torch.utils.cpp_extension.load compiles csrc/diffusion_losses.cu (kernels, no torch headers) and
csrc/bindings.cpp (tensor checks, stream, outputs) with nvcc, caching the build in
TORCH_EXTENSIONS_DIR. Used only where torch has CUDA; a CPU build of torch cannot build it. The
kernels read fp32, bf16 or fp16 storage and accumulate in fp32.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "bindings.cpp", CSRC / "diffusion_losses.cu")
EXTENSION_NAME = "ddrl_diffusion_losses"
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _build() -> tuple[ModuleType | None, str | None]:
    """(the extension module, None) or (None, why it could not be built)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None, "torch has no CUDA (a CPU build of torch cannot build CUDA extensions)"
    try:
        from torch.utils.cpp_extension import load

        logger.info("building the CUDA loss kernels (first use; cached in TORCH_EXTENSIONS_DIR)")
        module = load(name=EXTENSION_NAME, sources=[str(path) for path in SOURCES],
                      extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as error:  # a missing nvcc, a compiler error: report it, whatever its type
        return None, f"building {EXTENSION_NAME} from {CSRC} failed: {type(error).__name__}: {error}"
    return module, None


def load_problem() -> str | None:
    """None when the extension is built and loaded, else what went wrong."""
    return _build()[1]


def extension() -> ModuleType:
    module, problem = _build()
    if module is None:
        raise RuntimeError(problem)
    return module


def check_dtypes(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype not in STORAGE_DTYPES:
            raise TypeError(f"kernels.backend='cuda' reads float32, bfloat16 or float16; {name} is "
                            f"{tensor.dtype} (use backend 'triton' or 'compile' for float64)")


def _same_dtype(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # the kernels read the two data tensors with one storage type; mixing them costs one conversion pass
    return tensor if tensor.dtype == like.dtype else tensor.to(like.dtype)


def flow_matching_sq_sum(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    check_dtypes(v=v, x0=x0, noise=noise)
    return extension().flow_matching_sq_sum(v, x0, _same_dtype(noise, x0))


def flow_matching_grad(grad_sum: torch.Tensor, v: torch.Tensor, x0: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    return extension().flow_matching_grad(grad_sum.float().contiguous(), v, x0, _same_dtype(noise, x0))


def sde_sq_sum(v: torch.Tensor, x: torch.Tensor, prev: torch.Tensor, coef_x: torch.Tensor,
               coef_v: torch.Tensor, return_mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    check_dtypes(v=v, x=x, prev_sample=prev)
    return extension().sde_sq_sum(v, x, _same_dtype(prev, x), coef_x, coef_v, return_mean)


def sde_grad(grad_sum: torch.Tensor, grad_mean: torch.Tensor | None, v: torch.Tensor, x: torch.Tensor,
             prev: torch.Tensor, coef_x: torch.Tensor, coef_v: torch.Tensor) -> torch.Tensor:
    grad_mean = None if grad_mean is None else grad_mean.float().contiguous()
    return extension().sde_grad(grad_sum.float().contiguous(), grad_mean, v, x, _same_dtype(prev, x),
                                coef_x, coef_v)
