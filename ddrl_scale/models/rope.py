"""3D rotary position embedding over (frames, height, width) video tokens, for the DiT's self-attention.

The head dimension is split into three even parts, one per axis; each part rotates by its axis index.

The angles stay fp32 whatever precision the model computes in: in bf16 an angle of a Wan-size grid
is off by up to ~0.1 rad, which moves every token. `Fp32Buffers` keeps such buffers fp32 through a
module-wide half-precision cast (`model.bfloat16()`, `model.half()`); parallel/parallelize.py keeps
FSDP2 from casting them as forward inputs of the blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from ddrl_scale.runtime import upcast


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Rotary dims per axis (frames, height, width): even numbers summing to head_dim."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    frequencies = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return positions.to(torch.float64)[:, None] * frequencies[None, :]  # (N, dim / 2)


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles (N, head_dim / 2) for the N = T*H*W tokens of a (T, H, W) grid, row-major."""
    frames, height, width = grid
    t_index, h_index, w_index = torch.meshgrid(
        torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij"
    )
    parts = [
        _axis_angles(index.reshape(-1), dim, theta)
        for index, dim in zip((t_index, h_index, w_index), axis_dims(head_dim))
    ]
    return torch.cat(parts, dim=-1).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, heads, N, head_dim) by angles (N, head_dim / 2)."""
    pairs = upcast(x).reshape(*x.shape[:-1], -1, 2)
    cos, sin = angles.cos().to(pairs), angles.sin().to(pairs)
    first, second = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def _is_half(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


class Fp32Buffers(nn.Module):
    """A module whose `fp32_buffers()` keep their dtype when the module is cast to bf16 / fp16.

    Device moves and upcasts (`.double()` for reference checks) apply to them as to any buffer."""

    def fp32_buffers(self) -> Iterator[tuple[nn.Module, str]]:
        """(owner module, buffer name) of every buffer to keep in fp32."""
        return iter(())

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        kept = [(owner, name, owner._buffers[name]) for owner, name in self.fp32_buffers()
                if owner._buffers.get(name) is not None]
        out = super()._apply(fn, recurse)
        for owner, name, before in kept:
            after = owner._buffers[name]
            if after is not None and _is_half(after.dtype) and not _is_half(before.dtype):
                owner._buffers[name] = before.to(after.device)
        return out
