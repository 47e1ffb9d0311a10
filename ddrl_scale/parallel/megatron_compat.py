"""CPU compatibility layer for megatron-core: applied only where torch has no CUDA device.

megatron-core 0.16 assumes CUDA in a few places the tensor-parallel path reaches: buffers allocated
on `torch.cuda.current_device()` (sequence parallel, gradient buffers) and the CUDA RNG tracker
(`torch.cuda.get_rng_state` / `set_rng_state` / `manual_seed`). On a CPU-only torch this layer
maps exactly those calls to their CPU equivalents, so the same Megatron code runs on gloo in tests.
On a machine with CUDA it does nothing. It is explicit: `enable()` says what it changed.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_ORIGINAL: dict[str, object] = {}


def needed() -> bool:
    return not torch.cuda.is_available()


def enable() -> list[str]:
    """Map the CUDA calls megatron-core makes to CPU ones; returns the names replaced (none on GPU)."""
    if not needed() or _ORIGINAL:
        return sorted(_ORIGINAL)
    replacements = {
        "current_device": lambda: torch.device("cpu"),
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda state, device="cuda": torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.manual_seed(seed),
    }
    for name, replacement in replacements.items():
        _ORIGINAL[name] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, replacement)
    logger.warning("megatron-core on a CPU-only torch: torch.cuda.%s mapped to CPU equivalents",
                   ", torch.cuda.".join(sorted(replacements)))
    return sorted(_ORIGINAL)


def disable() -> None:
    """Restore the original torch.cuda functions."""
    for name, original in _ORIGINAL.items():
        setattr(torch.cuda, name, original)
    _ORIGINAL.clear()
