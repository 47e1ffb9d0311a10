"""sampler.kind=edm_ab2, the authors' release sampler (algo/edm.py): each piece against an
independent computation, then a short training run.

- the multistep update against the exact integral of the EDM probability-flow ODE in
  lambda = -log sigma with x0 interpolated linearly between the two predictions (quadrature);
- the step's log-prob against torch.distributions' Gaussian density of its sampled point;
- the grid against EDM's rho-spaced formula, the churn against its definition;
- on-policy, the trainer's recomputed log-probs equal the rollout's bit for bit (ratio 1 in fp32).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from ddrl_scale.algo.edm import (
    ab2_mean,
    churn_eta,
    edm_ab2_step,
    edm_schedule,
    edm_sigmas,
    edm_training_log_prob,
    flow_to_edm,
    sample_edm_ab2,
)
from ddrl_scale.config import ConfigError, load_config


def _ode_solution(x, x0, x0_prev, sigma, sigma_next, sigma_prev, points=200_001):
    """x(sigma_next) from x(sigma) for dx/dsigma = (x - x0(sigma)) / sigma: with y = x / sigma and
    lambda = -log sigma, dy/dlambda = e^lambda x0, so x_next = sigma_next (x / sigma + integral)."""
    lam, lam_next, lam_prev = -math.log(sigma), -math.log(sigma_next), -math.log(sigma_prev)
    grid = torch.linspace(lam, lam_next, points, dtype=torch.float64)
    slope = (x0_prev - x0) / (lam_prev - lam)
    weights = torch.exp(grid)
    integral_const = torch.trapezoid(weights, grid)
    integral_linear = torch.trapezoid(weights * (grid - lam), grid)
    return sigma_next * (x / sigma + integral_const * x0 + integral_linear * slope)


def test_multistep_update_is_the_exact_ode_step_of_the_linear_x0():
    generator = torch.Generator().manual_seed(0)
    x, x0, x0_prev = (torch.randn(2, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    for sigma_prev, sigma, sigma_next in [(80.0, 40.0, 20.0), (2.0, 1.1, 0.5), (0.3, 0.1, 0.002)]:
        got = ab2_mean(x, x0, sigma, sigma_next, (x0_prev, sigma_prev))
        expected = _ode_solution(x, x0, x0_prev, sigma, sigma_next, sigma_prev)
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    # without a previous prediction: the Euler (DDIM) step on x0
    got = ab2_mean(x, x0, 2.0, 0.5, None)
    torch.testing.assert_close(got, x0 + (0.5 / 2.0) * (x - x0))


def test_step_log_prob_is_the_gaussian_density_of_its_sample():
    generator = torch.Generator().manual_seed(1)
    x, x0, x0_prev, noise = (torch.randn(3, 2, 4, generator=generator) for _ in range(4))
    std = 0.37
    sample, log_prob, mean, std_b = edm_ab2_step(x0, x, 3.0, 1.5, std, (x0_prev, 6.0), noise)
    torch.testing.assert_close(sample, mean + std * noise)
    expected = Normal(mean.double(), std).log_prob(sample.double()).mean(dim=(1, 2))
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(std_b, torch.full((3,), std))
    # scoring a given point gives the same
    _, again, _, _ = edm_ab2_step(x0, x, 3.0, 1.5, std, (x0_prev, 6.0), prev_sample=sample)
    torch.testing.assert_close(again, log_prob)
    # std 0: deterministic
    same, zero, mean0, _ = edm_ab2_step(x0, x, 3.0, 1.5, 0.0)
    assert torch.equal(same, mean0) and torch.equal(zero, torch.zeros(3))


def test_grid_and_churn_follow_their_definitions():
    sigmas = edm_sigmas(4, 0.002, 80.0, 7.0)
    for i in range(5):
        expected = (80.0 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
        assert sigmas[i].item() == pytest.approx(expected, rel=1e-12)
    assert churn_eta(1.0, 20) == pytest.approx(1 / 21) and churn_eta(100.0, 20) == math.sqrt(1.2) - 1
    schedule = edm_schedule(4, 1.0, 0.0, 1e30)
    eta = min(1 / 5, math.sqrt(1.2) - 1)  # capped
    torch.testing.assert_close(schedule["levels"][:4], sigmas[:4] * (1 + eta))
    assert schedule["levels"][4].item() == 0.0  # the clean sample
    for i in range(3):  # std = sqrt(hat^2 - sigma^2) at the next level
        hat, sigma = schedule["levels"][i + 1].item(), sigmas[i + 1].item()
        assert schedule["stds"][i].item() == pytest.approx(math.sqrt(hat**2 - sigma**2), rel=1e-12)
    assert schedule["stds"][3].item() == 0.0
    no_churn = edm_schedule(4, 1.0, 1.0, 1e30)  # s_t_min = 1: the low levels are not churned
    assert all(no_churn["stds"][i].item() == 0.0 for i in range(4) if sigmas[i + 1] <= 1.0)


def test_rollout_and_training_log_probs_agree_on_policy():
    torch.manual_seed(0)
    weight = torch.randn(5, 5, dtype=torch.float64) * 0.1

    def velocity(x_t, t):  # a small fixed "model" in flow space
        return x_t @ weight + t.reshape(-1, 1) * 0.3

    schedule = edm_schedule(6, 1.0, 0.0, 1e30)
    noise = torch.randn(3, 5, dtype=torch.float64)
    trajectory = sample_edm_ab2(velocity, noise, schedule)
    assert trajectory.states.shape == (7, 3, 5) and trajectory.log_probs.shape == (6, 3)
    assert trajectory.x0_preds.shape == (6, 3, 5) and torch.isfinite(trajectory.log_probs).all()
    for index in range(6):
        t = float(trajectory.sigmas[index])
        v = velocity(trajectory.states[index], torch.full((3,), t))  # as the sampler calls it
        log_prob, mean, std = edm_training_log_prob(v, trajectory, index, schedule, 1.0)
        assert torch.equal(log_prob, trajectory.log_probs[index])
        if index < 5:  # the recorded next state is mean + std x noise in EDM space
            nxt = flow_to_edm(trajectory.states[index + 1], float(schedule["levels"][index + 1]))
            z = (nxt - mean) / std[0]
            assert abs(z.mean().item()) < 3 and 0.2 < z.std().item() < 3


def test_edm_ab2_trains_on_policy_with_ratio_exactly_one(tiny_overrides):
    from ddrl_scale.train.metrics import read_metrics
    from ddrl_scale.train.run import run_training

    config = load_config(None, [*tiny_overrides, "sampler.kind=edm_ab2", "algo.preset=release",
                                "train.eval_prompts=0", "train.steps=2"])
    assert run_training(config)["steps"] == 2
    records = read_metrics(config.run.output_dir + "/metrics.jsonl")
    assert records[0]["ratio_max_dev"] == 0.0  # fp32, on-policy: recomputed == behaviour log-prob
    assert all(math.isfinite(r["policy_loss"]) and math.isfinite(r["grad_norm"]) for r in records)


@pytest.mark.parametrize("override, key", [("rollout.mode=disaggregated", "rollout.mode"),
                                           ("algo.kl_beta=0.1", "algo.kl_beta"),
                                           ("sampler.edm_sigma_min=100", "sampler.edm_sigma_min")])
def test_edm_ab2_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["sampler.kind=edm_ab2", override, "rollout.num_ranks=1"])
