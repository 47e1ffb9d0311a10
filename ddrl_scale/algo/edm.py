"""The authors' release sampler (sampler.kind=edm_ab2): EDM churn + second-order Adams-Bashforth
multistep on x0 predictions, with the exact Gaussian log-probability of each stochastic transition.
The rollout stage of the data flow, like `samplers.sde_step`.

Derived from nvidia-cosmos/cosmos-rl at 89f2e5b: `cosmos_rl/policy/model/wfm/sampler/__init__.py`
(`get_rev_ts` lines 512-551: the sigma grid; `differential_equation_solver` lines 575-663: churn
eta = min(s_churn / (S + 1), sqrt(1.2) - 1), hat_sigma = (1 + eta) sigma, x += sqrt(hat_sigma^2 -
sigma^2) s_noise eps for s_t_min < sigma < s_t_max; `order2_fn` / `reg_x0_euler_step` /
`res_x0_rk2_step` lines 170-259: the update; `_forward_impl` lines 751-797: one last x0 prediction
at sigma_min, `sample_clean`) and its use in `cosmos_rl/policy/trainer/wfm_trainer.py`
(`get_rollout_samples` lines 857-1011: a step goes from the churned state x_i at hat_sigma_i to
mu_i = update(x_i) at sigma_{i+1}, and the next recorded state is the churned one, so the transition
is N(mu_i, std^2) with std = sigma_{i+1} sqrt(eta^2 + 2 eta) s_noise, lines 474-482; the AB2 term
uses the rollout's previous x0 prediction, `kwargs["x0_preds"]`).

EDM space: x = x0 + sigma n. The policy is a rectified-flow velocity model on x_t = (1 - t) x0 + t n,
so x_t = x / (1 + sigma), t = sigma / (1 + sigma), x0 = x_t - t v. Trajectories keep rectified-flow
states (what the model and the trainer read) and these functions convert.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ddrl_scale.algo.samplers import Trajectory
from ddrl_scale.runtime import upcast

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0) -> torch.Tensor:
    """The num_steps + 1 EDM noise levels (float64, descending, sigma_max -> sigma_min)."""
    index = torch.arange(num_steps + 1, dtype=torch.float64)
    low, high = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (high + index / num_steps * (low - high)) ** rho


def churn_eta(s_churn: float, num_steps: int) -> float:
    """EDM's churn factor: hat_sigma = (1 + eta) sigma."""
    return min(s_churn / (num_steps + 1), math.sqrt(1.2) - 1.0)


def churned(sigma: float, eta: float, s_t_min: float, s_t_max: float) -> float:
    """hat_sigma: sigma raised by the churn where s_t_min < sigma < s_t_max, else sigma."""
    return sigma * (1.0 + eta) if s_t_min < sigma < s_t_max else sigma


def transition_std(sigma_next: float, eta: float, s_noise: float) -> float:
    """The std of the churn noise added at sigma_next: sqrt(hat^2 - sigma^2) s_noise."""
    return sigma_next * math.sqrt(eta**2 + 2.0 * eta) * s_noise


def ab2_mean(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float,
             previous: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """The deterministic update (fp32/fp64 as the inputs) from x at sigma to sigma_next: an Euler
    step on x0 without a previous prediction, else the second-order multistep (exponential
    integrator in lambda = -log sigma) with previous = (x0 at prev_sigma, prev_sigma)."""
    if previous is None:
        return (sigma - sigma_next) / sigma * x0 + sigma_next / sigma * x
    prev_x0, prev_sigma = previous
    lam, lam_next, lam_prev = -math.log(sigma), -math.log(sigma_next), -math.log(prev_sigma)
    h = lam_next - lam
    c2 = (lam_prev - lam) / h
    phi1 = math.expm1(-h) / -h
    phi2 = (phi1 - 1.0) / -h
    b1, b2 = phi1 - phi2 / c2, phi2 / c2
    return math.exp(-h) * x + h * (b1 * x0 + b2 * prev_x0)


def edm_ab2_step(
    x0: torch.Tensor, x: torch.Tensor, sigma: float, sigma_next: float, std: float,
    previous: tuple[torch.Tensor, float] | None = None, noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One transition in EDM space, x (churned, at sigma) -> prev_sample ~ N(mean, std^2) (the next
    churned state). x0: the model's prediction at (x, sigma). Same outputs as `sde_step`: fp32
    (prev_sample, log_prob (B,) = the Gaussian log-density averaged over non-batch dims, mean, std
    (B,)). std = 0 (no churn at sigma_next) is a deterministic step: prev_sample = mean, log_prob 0.
    """
    x, x0 = upcast(x), upcast(x0)
    previous = None if previous is None else (upcast(previous[0]), previous[1])
    mean = ab2_mean(x, x0, sigma, sigma_next, previous)
    std_b = torch.full((x.shape[0],), float(std), dtype=mean.dtype, device=mean.device)
    if prev_sample is None:
        if std == 0:
            prev_sample = mean
        else:
            noise = torch.randn_like(mean) if noise is None else noise.to(mean.dtype)
            prev_sample = mean + std * noise
    prev_sample = prev_sample.to(mean.dtype)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std_b


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(sample; mean, std^2) averaged over non-batch dims (B,); 0 for std = 0 (deterministic)."""
    if std == 0:
        return torch.zeros(mean.shape[0], dtype=mean.dtype, device=mean.device)
    dims = tuple(range(1, mean.dim()))
    return (-((sample.detach() - mean) ** 2) / (2.0 * std**2)).mean(dim=dims) \
        - math.log(std) - _LOG_SQRT_2PI


# -- rectified-flow <-> EDM ----------------------------------------------------------------------
def edm_to_flow(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x / (1.0 + sigma)


def flow_to_edm(x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_t * (1.0 + sigma)


def flow_time(sigma: float) -> float:
    """The rectified-flow time t of EDM noise level sigma."""
    return sigma / (1.0 + sigma)


def x0_from_velocity(v: torch.Tensor, x_t: torch.Tensor, t: float) -> torch.Tensor:
    return upcast(x_t) - t * upcast(v)


def schedule_from(sampler) -> dict:
    """edm_schedule from the config's sampler section."""
    return edm_schedule(sampler.num_steps, sampler.s_churn, sampler.s_t_min, sampler.s_t_max,
                        sampler.edm_sigma_min, sampler.edm_sigma_max, sampler.edm_rho)


def edm_schedule(num_steps: int, s_churn: float, s_t_min: float, s_t_max: float,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> dict:
    """Everything a rollout and the trainer need of the grid: the targets sigma_{i+1} (S,), the
    churned level of every recorded state (S + 1,; the last is 0, the clean sample), each
    transition's std at s_noise = 1 (S,; 0 on the last, whose sample is the x0 prediction: that
    step is deterministic and carries no policy gradient), as float64 tensors; and sigma_max."""
    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    eta = churn_eta(s_churn, num_steps)
    hats = [churned(sigma, eta, s_t_min, s_t_max) for sigma in sigmas[:-1]] + [0.0]
    stds = [transition_std(sigmas[i + 1], eta, 1.0) if hats[i + 1] > sigmas[i + 1] else 0.0
            for i in range(num_steps - 1)] + [0.0]
    return {"targets": torch.tensor(sigmas[1:], dtype=torch.float64),
            "levels": torch.tensor(hats, dtype=torch.float64),
            "stds": torch.tensor(stds, dtype=torch.float64), "sigma_max": sigmas[0]}


@torch.no_grad()
def sample_edm_ab2(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    schedule: dict,
    s_noise: float = 1.0,
    step_noise: Callable[[int], torch.Tensor] | None = None,
    churn_noise: torch.Tensor | None = None,
) -> Trajectory:
    """Roll out the release sampler from standard normal `noise` (B, ...): x = sigma_max noise, churned,
    then S transitions; the last state is the clean x0 prediction at sigma_min (the release's
    `sample_clean`). velocity_fn(x_t, t_B) is the rectified-flow policy. step_noise(i): the standard
    normal of the churn after step i; churn_noise: the first state's churn noise (default: drawn).

    Returns a Trajectory of rectified-flow states, with `sigmas` the flow time of each state,
    `log_probs` (S, B) (0 on the deterministic last step) and `x0_preds` (S, B, ...), the x0
    prediction at each state that the next step's multistep term reuses.
    """
    targets, levels = schedule["targets"].tolist(), schedule["levels"].tolist()
    stds = [value * s_noise for value in schedule["stds"].tolist()]
    num_steps, batch = len(targets), noise.shape[0]
    first = schedule["sigma_max"]
    x = upcast(noise) * first
    if levels[0] > first:  # the churn of the first state, as the release applies it at step 0
        draw = torch.randn_like(x) if churn_noise is None else upcast(churn_noise)
        x = x + math.sqrt(levels[0] ** 2 - first**2) * s_noise * draw
    # every step reads its EDM state back from the stored flow state, as the trainer does, so the
    # behaviour log-probs equal the recomputed ones bit for bit (on-policy ratio exactly 1)
    states, log_probs, x0_preds, previous = [edm_to_flow(x, levels[0])], [], [], None
    for index in range(num_steps):
        sigma, t = levels[index], flow_time(levels[index])
        x_t = states[-1]
        x0 = x0_from_velocity(velocity_fn(x_t, torch.full((batch,), t, device=x.device)), x_t, t)
        noise_i = None
        if stds[index] > 0:
            noise_i = step_noise(index) if step_noise is not None else torch.randn_like(x_t)
        x = flow_to_edm(x_t, sigma)
        mean = ab2_mean(x, x0, sigma, targets[index], previous)  # scored below, once, as trained
        x_next = mean if noise_i is None else mean + stds[index] * upcast(noise_i).to(mean.dtype)
        if index == num_steps - 1:  # sample_clean: the x0 prediction at sigma_min is the sample
            x_t_last = edm_to_flow(x_next, targets[index])
            t_last = flow_time(targets[index])
            v_last = velocity_fn(x_t_last, torch.full((batch,), t_last, device=x.device))
            x_next = x0_from_velocity(v_last, x_t_last, t_last)
        states.append(edm_to_flow(x_next, levels[index + 1]))
        log_probs.append(gaussian_log_prob(flow_to_edm(states[-1], levels[index + 1]), mean,
                                           stds[index]))
        x0_preds.append(x0)
        previous = (x0, sigma)
    flow_times = torch.tensor([flow_time(level) for level in levels], dtype=torch.float64)
    return Trajectory(states=torch.stack(states), means=None, log_probs=torch.stack(log_probs),
                      sigmas=flow_times, x0_preds=torch.stack(x0_preds))


def edm_training_log_prob(v: torch.Tensor, trajectory: Trajectory, index: int, schedule: dict,
                          s_noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log_prob (B,), mean, std (B,)) of the rollout's transition `index` under the policy whose
    velocity at that state is v (with gradient); the multistep term reuses the rollout's previous
    x0 prediction (detached), as the release's trainer does."""
    levels, targets = schedule["levels"].tolist(), schedule["targets"].tolist()
    sigma, t = levels[index], flow_time(levels[index])
    x_t = trajectory.states[index]
    x = flow_to_edm(upcast(x_t), sigma)
    x0 = x0_from_velocity(v, x_t, t)
    previous = None if index == 0 else (trajectory.x0_preds[index - 1].detach(), levels[index - 1])
    next_edm = flow_to_edm(upcast(trajectory.states[index + 1]), levels[index + 1])
    _, log_prob, mean, std = edm_ab2_step(x0, x, sigma, targets[index],
                                          float(schedule["stds"][index]) * s_noise, previous,
                                          prev_sample=next_edm)
    return log_prob, mean, std

