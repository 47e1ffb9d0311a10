"""Exponential moving average of the policy weights, updated by the engines after every optimizer
step (the optimizer-step stage of docs/architecture.md's data flow).

optim.ema_kind: `constant` (decay optim.ema_decay every step; 0 = off) or `power`, the power EMA of
EDM2 (Karras et al. 2024) as the authors' release uses it (cosmos-rl `cosmos_rl/utils/wfm/ema.py`,
`PowerEMATracker`): decay 0 at iteration 0, then (1 - 1/(it + 1))^(gamma + 1), with gamma the
largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 for the relative
width s = optim.ema_rate (the release's `ema.rate`, 0.1).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn


def ema_enabled(optim) -> bool:
    return optim.ema_kind == "power" or optim.ema_decay > 0


@functools.cache
def power_ema_exponent(rate: float) -> float:
    """gamma of EDM2's power EMA for the relative standard deviation `rate` (sigma_rel)."""
    roots = np.roots([1.0, 7.0, 16.0 - rate**-2, 12.0 - rate**-2])
    return float(roots.real.max())


def ema_decay_at(optim, iteration: int) -> float:
    """The decay of the EMA update after optimizer step `iteration` (0 = the first)."""
    if optim.ema_kind != "power":
        return optim.ema_decay
    if iteration <= 0:
        return 0.0
    return (1.0 - 1.0 / (iteration + 1)) ** (power_ema_exponent(optim.ema_rate) + 1.0)


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: param.detach().float().clone() for name, param in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """decay: this update's (a power EMA's changes per step); default the constant one."""
        weight = 1.0 - (self.decay if decay is None else decay)
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach().float(), weight)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            param.copy_(self.shadow[name].to(param.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        self.shadow = {name: state[name].float().clone() for name in self.shadow}
