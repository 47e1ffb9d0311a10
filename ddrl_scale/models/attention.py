"""Attention kernel chosen at run time: flash-attn on CUDA when importable, else torch SDPA.

Used by every attention layer of the DiT (models/dit.py); the model never imports flash-attn itself.

Under CUDA autocast the choice is made for the dtype the attention computes in (autocast's), not the
dtype q / k arrive in: they leave the fp32 QK RMSNorm and the rotary in fp32 while v is bf16, and
SDPA, which autocast casts to bf16 itself, was chosen every time (issue 16). The flash path casts
q / k / v to that dtype, as autocast would for SDPA.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

try:  # flash-attn is a GPU-only optional extra (`pip install ddrl-scale[flash]`)
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

_logged: set[str] = set()


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Return "flash" or "sdpa" for `requested` in auto | sdpa | flash; explain a refused flash."""
    flash_usable = (
        flash_attn_func is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    )
    if requested == "flash" and not flash_usable:
        raise RuntimeError(
            "model.attention_backend=flash needs the flash-attn package, a CUDA device and fp16/bf16 "
            f"activations (have flash-attn={flash_attn_func is not None}, device={device.type}, "
            f"dtype={dtype}); use model.attention_backend=sdpa or auto"
        )
    backend = "flash" if requested in ("auto", "flash") and flash_usable else "sdpa"
    if backend not in _logged:
        _logged.add(backend)
        logger.info("attention backend: %s (requested %s)", backend, requested)
    return backend


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype attention on `tensor` computes in: autocast's on its device when enabled there."""
    device_type = tensor.device.type
    if tensor.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              backend: str = "auto") -> torch.Tensor:
    """Multi-head attention without mask.

    query: (B, heads, N, head_dim); key, value: (B, heads, M, head_dim) -> (B, heads, N, head_dim).
    """
    dtype = compute_dtype(query)
    if resolve_backend(backend, query.device, dtype) == "flash":
        # flash-attn takes (B, N, heads, head_dim), all three in one half dtype
        query, key, value = (tensor.to(dtype).transpose(1, 2) for tensor in (query, key, value))
        return flash_attn_func(query, key, value).transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value)
