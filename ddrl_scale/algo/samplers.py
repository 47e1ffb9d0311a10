"""Samplers with log-probabilities: the rollout stage of the data flow (policy -> trajectories).

Rectified flow: x_t = (1 - t) x0 + t noise, velocity v = noise - x0, sampled from t = 1 to t = 0.
`sde_step` is the Flow-GRPO stochastic step (Liu et al. 2025, "Flow-GRPO", eq. for the SDE with
log-probability; see shared docs DDRL.md), computed in fp32 whatever the model's dtype, because bf16
drift would make the on-policy importance ratio differ from 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddrl_scale.runtime import upcast

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or (B,) tensor as (B, 1, ..., 1) of like's dtype, broadcastable against `like`."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.dim() == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def sde_step(
    v: torch.Tensor,
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float = 0.7,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    log_density: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One Gaussian transition x (at sigma) -> prev_sample (at sigma_next < sigma).

    v, x: (B, ...); sigma, sigma_next: floats or (B,) tensors; noise: standard normal like x, drawn
    if None; prev_sample: the point to score instead of sampling one (training recomputes the
    log-prob of the rollout's x_{i+1}). Returns fp32 (prev_sample (B, ...), log_prob (B,) = Gaussian
    log-density averaged over the non-batch dims, mean (B, ...), std (B,) = the transition's standard
    deviation std_t * sqrt(-dt)). log_density=False skips the log-prob (None; one elementwise pass
    less) for a caller that computes it with another kernel.
    """
    v, x = upcast(v), upcast(x)
    sigma_b, sigma_next_b = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = sigma_next_b - sigma_b
    # std_t = a sqrt(sigma / (1 - sigma)) is infinite at sigma = 1; Flow-GRPO evaluates the first
    # step's denominator at the next schedule value instead, which is sigma_next there.
    denominator = 1.0 - torch.where(sigma_b >= 1.0, sigma_next_b, sigma_b)
    std_t = noise_level * torch.sqrt(sigma_b / denominator)
    mean = (x * (1.0 + std_t**2 * dt / (2.0 * sigma_b))
            + v * (1.0 + std_t**2 * (1.0 - sigma_b) / (2.0 * sigma_b)) * dt)
    std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(x)
        prev_sample = mean + std * noise.to(mean.dtype)
    prev_sample = prev_sample.to(mean.dtype)
    log_prob = None
    if log_density:
        density = -((prev_sample.detach() - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
        log_prob = density.mean(dim=tuple(range(1, x.dim())))
    return prev_sample, log_prob, mean, std.reshape(-1)


def ode_step(v: torch.Tensor, x: torch.Tensor, sigma: float | torch.Tensor,
             sigma_next: float | torch.Tensor) -> torch.Tensor:
    """Euler step of the probability-flow ODE: x + v (sigma_next - sigma), in fp32."""
    x = upcast(x)
    return x + upcast(v) * (_per_sample(sigma_next, x) - _per_sample(sigma, x))


@dataclass
class Trajectory:
    """A batch of rollouts. S = sampling steps, B = samples.

    states: (S + 1, B, ...) x_0 = initial noise ... x_S = final sample; means: (S, B, ...) mean of
    each SDE transition when recorded (else None: as large as the states, and training recomputes
    them); log_probs: (S, B) behaviour log-probs; sigmas: (S + 1,) float64 noise level (flow time)
    of each state: the schedule, or for edm_ab2 the churned levels.
    """

    states: torch.Tensor
    means: torch.Tensor | None
    log_probs: torch.Tensor | None
    sigmas: torch.Tensor
    x0_preds: torch.Tensor | None = None  # (S, B, ...) sampler.kind=edm_ab2: each state's x0 prediction

    @property
    def final(self) -> torch.Tensor:
        return self.states[-1]

    @property
    def initial_noise(self) -> torch.Tensor:
        return self.states[0]


@torch.no_grad()
def sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    kind: str = "sde",
    noise_level: float = 0.7,
    step_noise: Callable[[int], torch.Tensor] | None = None,
    log_prob_fn: Callable[..., torch.Tensor] | None = None,
    record_means: bool = False,
) -> Trajectory:
    """Run the sampler from `noise` (B, ...) over `sigmas` (S + 1,); velocity_fn(x, sigma_B) -> v.

    kind "sde" records the transition means and behaviour log-probs (rollouts); step_noise(i)
    gives the standard normal (B, ...) of step i (default: torch's global RNG). "ode" is the
    deterministic Euler sampler (evaluation). log_prob_fn(v, x, prev_sample, sigma, sigma_next,
    noise_level) -> (B,) computes the behaviour log-probs instead of sde_step (the fused kernel the
    training step uses: the same function on the same inputs keeps the on-policy ratio exactly 1).
    record_means keeps every transition's mean in the trajectory (for inspection and tests).
    """
    if kind not in ("sde", "ode"):
        raise ValueError(f"sampler kind must be 'sde' or 'ode', got {kind!r}")
    batch = noise.shape[0]
    x = upcast(noise)
    states, means, log_probs = [x], [], []
    for index in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
        v = velocity_fn(x, torch.full((batch,), sigma, device=x.device))
        if kind == "ode":
            x = ode_step(v, x, sigma, sigma_next)
        else:
            noise_i = step_noise(index) if step_noise is not None else torch.randn_like(x)
            previous = x
            x, log_prob, mean, _ = sde_step(v, x, sigma, sigma_next, noise_level, noise=noise_i,
                                            log_density=log_prob_fn is None)
            if log_prob_fn is not None:
                log_prob = log_prob_fn(v, previous, x, sigma, sigma_next, noise_level)
            if record_means:
                means.append(mean)
            log_probs.append(log_prob)
        states.append(x)
    return Trajectory(
        states=torch.stack(states),
        means=torch.stack(means) if means else None,
        log_probs=torch.stack(log_probs) if log_probs else None,
        sigmas=sigmas,
    )
