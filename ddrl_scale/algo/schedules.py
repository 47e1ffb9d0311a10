"""Rectified-flow noise schedules: x_t = (1 - t) x0 + t noise, sampled from t = 1 down to t = 0."""

from __future__ import annotations

import torch


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Shifted timesteps t' = s t / (1 + (s - 1) t), as video flow models use (s > 1: more high noise)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sigma_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The num_steps + 1 noise levels (float64, descending, 1 -> 0) of a sampling run."""
    return shift_timesteps(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma noise; sigma is (B,) and broadcasts over non-batch dims."""
    sigma = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - sigma) * x0 + sigma * noise

