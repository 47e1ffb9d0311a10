"""Run-time choices shared by every command: device, autocast dtype, threads, seeds, logging."""

from __future__ import annotations

import contextlib
import logging
import os
import random

import numpy as np
import torch


def autocast(device: torch.device, dtype: str):
    """bf16 autocast for run.dtype=bf16, a no-op context for fp32."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(num_threads: int = 0, level: int = logging.INFO) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
    rank = int(os.environ.get("RANK", "0"))
    # rank 0 speaks; other ranks only warn
    logging.basicConfig(level=level if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision (and fp32) tensors; float64 stays float64 (reference checks use it)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()
