"""Advantages, DDRL loss terms and the registry against hand computations (DDRL.md)."""

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ddrl_scale.algo import get, registry
from ddrl_scale.algo.advantages import group_advantages
from ddrl_scale.algo.losses import clipped_policy_loss, ddrl_loss, flow_matching_loss, reverse_kl


def _np_group_norm(values, group_size, eps=1e-4):
    grouped = np.asarray(values, dtype=np.float64).reshape(-1, group_size)
    mean = grouped.mean(axis=1, keepdims=True)
    std = np.sqrt(((grouped - mean) ** 2).mean(axis=1, keepdims=True))  # population std
    return ((grouped - mean) / (std + eps)).reshape(-1)


REWARDS = {
    "aesthetic": [0.1, 0.5, 0.2, 0.9, 3.0, 3.0, 3.0, 3.0],
    "motion": [10.0, -4.0, 2.0, 7.0, 0.0, 1.0, 5.0, -2.0],
}


def test_group_advantages_weighted_average_matches_numpy():
    """sum_k w_k A_k / sum_k |w_k| with per-group population-std normalisation and eps 1e-4."""
    weights = {"aesthetic": 2.0, "motion": -0.5}
    rewards = {name: torch.tensor(values) for name, values in REWARDS.items()}
    out = group_advantages(rewards, weights, group_size=4, clamp=0.0)
    expected = (2.0 * _np_group_norm(REWARDS["aesthetic"], 4)
                - 0.5 * _np_group_norm(REWARDS["motion"], 4)) / 2.5
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    # a constant group has zero advantage (the eps keeps it finite)
    single = group_advantages({"aesthetic": rewards["aesthetic"]}, weights, 4, clamp=0.0)
    assert torch.equal(single[4:], torch.zeros(4))


def test_group_advantages_eps_and_clamp():
    """Values 0, 2e-4 give +-1e-4 / (1e-4 + 1e-4) = +-0.5 (eps counts); clamp limits to +-c."""
    rewards = {"r": torch.tensor([0.0, 2e-4, 0.0, 2e-4], dtype=torch.float64)}
    out = group_advantages(rewards, {"r": 1.0}, group_size=4)
    np.testing.assert_allclose(out.numpy(), [-0.5, 0.5, -0.5, 0.5], rtol=1e-4)
    # a single outlier in a group of 64 is sqrt(63) ~ 7.9 std above the mean: clamped to 5
    values = torch.zeros(64)
    values[0] = 1.0
    unclamped = group_advantages({"r": values}, {"r": 1.0}, 64, clamp=0.0)
    assert unclamped[0].item() == pytest.approx(np.sqrt(63), rel=1e-3)
    clamped = group_advantages({"r": values}, {"r": 1.0}, 64, clamp=5.0)
    assert clamped[0].item() == 5.0
    assert torch.equal(clamped[1:], unclamped[1:])
    assert group_advantages({"r": values}, {"r": 1.0}, 64, clamp=2.0)[0].item() == 2.0


def test_group_advantages_exp_transform_then_clamp():
    """exp_transform: A <- -exp(-A), then clamp to [-5, 5]."""
    rewards = {"r": torch.tensor(REWARDS["motion"])}
    base = _np_group_norm(REWARDS["motion"], 4)
    out = group_advantages(rewards, {"r": 3.0}, 4, exp_transform=True, clamp=5.0)
    np.testing.assert_allclose(out.numpy(), np.clip(-np.exp(-base), -5, 5), rtol=1e-5, atol=1e-6)
    assert (out < 0).all()  # -exp(-A) is always negative
    # a strongly negative advantage goes below -5 after the transform and is clamped
    values = torch.zeros(64)
    values[0] = -1.0
    assert group_advantages({"r": values}, {"r": 1.0}, 64, exp_transform=True)[0].item() == -5.0


def test_group_advantages_shape_errors():
    """Wrong shapes, a size not divisible by the group, no rewards or all-zero weights raise."""
    with pytest.raises(ValueError, match="group size"):
        group_advantages({"r": torch.zeros(6)}, {"r": 1.0}, group_size=4)
    with pytest.raises(ValueError, match="expected"):
        group_advantages({"r": torch.zeros(2, 4)}, {"r": 1.0}, group_size=4)
    with pytest.raises(ValueError):
        group_advantages({}, {}, group_size=4)
    with pytest.raises(ValueError, match="zero"):
        group_advantages({"r": torch.zeros(4)}, {"r": 0.0}, group_size=4)


def test_policy_ratio_exactly_one_on_policy():
    """log_prob == old_log_prob -> ratio exactly 1, loss = -mean(A), nothing clipped."""
    log_prob = torch.tensor([-1.3, 0.2, 5.0, -7.25])
    advantages = torch.tensor([1.0, -2.0, 0.5, 3.0])
    loss, stats = clipped_policy_loss(log_prob, log_prob.clone(), advantages, clip_eps=1e-4)
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max_dev"].item() == 0.0
    assert stats["clip_fraction"].item() == 0.0
    assert loss.item() == pytest.approx(-advantages.mean().item(), rel=1e-7)


def _policy_case(ratios, advantages, clip_eps=0.2):
    log_prob = torch.log(torch.tensor(ratios, dtype=torch.float64)).requires_grad_(True)
    old = torch.zeros(len(ratios), dtype=torch.float64)
    loss, stats = clipped_policy_loss(log_prob, old, torch.tensor(advantages, dtype=torch.float64),
                                      clip_eps)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss, stats, grad


def test_policy_clipping_positive_advantage():
    """A > 0: ratio above 1 + eps is clipped (zero gradient), ratio below 1 - eps is not."""
    ratios, advantages = [1.5, 0.5, 1.1], [2.0, 2.0, 2.0]
    loss, stats, grad = _policy_case(ratios, advantages)
    # per sample: max(-A r, -A clip(r)) = -2 * [1.2, 0.5, 1.1]
    assert loss.item() == pytest.approx(-2.0 * (1.2 + 0.5 + 1.1) / 3)
    # d/dlogp of -A r / 3 = -A r / 3 where unclipped; 0 where clipped
    np.testing.assert_allclose(grad.numpy(), [0.0, -2.0 * 0.5 / 3, -2.0 * 1.1 / 3], rtol=1e-12)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)


def test_policy_clipping_negative_advantage():
    """A < 0: ratio below 1 - eps is clipped (zero gradient), ratio above 1 + eps is not."""
    ratios, advantages = [1.5, 0.5, 0.9], [-1.0, -1.0, -1.0]
    loss, stats, grad = _policy_case(ratios, advantages)
    # per sample: max(r, clip(r)) = [1.5, 0.8, 0.9]
    assert loss.item() == pytest.approx((1.5 + 0.8 + 0.9) / 3)
    np.testing.assert_allclose(grad.numpy(), [1.5 / 3, 0.0, 0.9 / 3], rtol=1e-12)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    assert stats["ratio_max_dev"].item() == pytest.approx(0.5)


def test_policy_old_log_prob_gets_no_gradient():
    """The behaviour log-prob is a constant: no gradient flows into it."""
    log_prob = torch.tensor([0.1, -0.1], requires_grad=True)
    old = torch.tensor([0.0, 0.0], requires_grad=True)
    loss, _ = clipped_policy_loss(log_prob, old, torch.tensor([1.0, -1.0]), clip_eps=0.5)
    loss.backward()
    assert old.grad is None
    assert log_prob.grad is not None and log_prob.grad.abs().sum() > 0


def test_flow_matching_loss_definition():
    """mean over dims of w * (v - (noise - x0))^2 per sample, by an explicit float64 loop."""
    generator = torch.Generator().manual_seed(0)
    v, x0, noise = (torch.randn(3, 2, 3, 4, generator=generator) for _ in range(3))
    weight = torch.tensor([0.5, 2.0, 7.0])
    out = flow_matching_loss(v, x0, noise, weight)
    unweighted = flow_matching_loss(v, x0, noise)
    assert out.shape == unweighted.shape == (3,)
    for i in range(3):
        diff = v[i].double().numpy() - (noise[i].double().numpy() - x0[i].double().numpy())
        expected = float(np.sum(diff**2) / diff.size)
        assert unweighted[i].item() == pytest.approx(expected, rel=1e-6)
        assert out[i].item() == pytest.approx(weight[i].item() * expected, rel=1e-6)
    # the exact velocity has zero loss
    assert torch.equal(flow_matching_loss(noise - x0, x0, noise), torch.zeros(3))


def test_reverse_kl_equals_gaussian_kl():
    """reverse_kl == KL(N(mu_ref, s) || N(mu, s)) of torch.distributions, averaged over dims."""
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(4, 3, 5, generator=generator)
    ref_mean = torch.randn(4, 3, 5, generator=generator)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0])
    out = reverse_kl(mean, ref_mean, std)
    scale = std.double().view(-1, 1, 1)
    expected = kl_divergence(Normal(ref_mean.double(), scale), Normal(mean.double(), scale))
    torch.testing.assert_close(out.double(), expected.mean(dim=(1, 2)), rtol=1e-5, atol=1e-7)
    # no gradient flows into the frozen reference
    ref = ref_mean.clone().requires_grad_(True)
    policy = mean.clone().requires_grad_(True)
    reverse_kl(policy, ref, std).sum().backward()
    assert ref.grad is None and policy.grad.abs().sum() > 0


def _loss_inputs():
    generator = torch.Generator().manual_seed(2)
    log_prob = torch.randn(4, generator=generator) * 0.01
    return {
        "log_prob": log_prob,
        "old_log_prob": log_prob + torch.tensor([0.0, 0.3, -0.3, 0.001]),
        "advantages": torch.tensor([1.0, -0.5, 2.0, -1.5]),
        "clip_eps": 0.1,
        "data_loss": torch.rand(6, generator=generator),
        "kl": torch.rand(4, generator=generator),
    }


def _policy_reference(inputs):
    ratio = np.exp((inputs["log_prob"] - inputs["old_log_prob"]).double().numpy())
    advantage = inputs["advantages"].double().numpy()
    eps = inputs["clip_eps"]
    return np.mean(np.maximum(-advantage * ratio, -advantage * np.clip(ratio, 1 - eps, 1 + eps)))


def test_ddrl_loss_combination():
    """loss = scale * (pw * policy + kl_beta * mean(kl) + data_beta * mean(data)) by hand."""
    inputs = _loss_inputs()
    policy = _policy_reference(inputs)
    data, kl = inputs["data_loss"].double().mean().item(), inputs["kl"].double().mean().item()
    loss, stats = ddrl_loss(policy_weight=0.7, data_beta=0.01, kl_beta=0.04, loss_scale=10.0,
                            **inputs)
    assert loss.item() == pytest.approx(10.0 * (0.7 * policy + 0.04 * kl + 0.01 * data), rel=1e-5)
    assert stats["policy_loss"].item() == pytest.approx(policy, rel=1e-5)
    assert stats["data_loss"].item() == pytest.approx(data, rel=1e-6)
    assert stats["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert stats["loss"].item() == pytest.approx(loss.item())


def test_ddrl_loss_baselines_are_configs():
    """policy_weight 0 -> pure SFT; data_beta 0 -> Flow-GRPO (data reported, not in the loss)."""
    inputs = _loss_inputs()
    sft, _ = ddrl_loss(policy_weight=0.0, data_beta=1.0, kl_beta=0.0, loss_scale=1.0, **inputs)
    assert sft.item() == pytest.approx(inputs["data_loss"].double().mean().item(), rel=1e-6)
    grpo, stats = ddrl_loss(policy_weight=1.0, data_beta=0.0, kl_beta=0.5, loss_scale=2.0, **inputs)
    expected = 2.0 * (_policy_reference(inputs) + 0.5 * inputs["kl"].double().mean().item())
    assert grpo.item() == pytest.approx(expected, rel=1e-5)
    assert "data_loss" in stats
    no_kl, _ = ddrl_loss(policy_weight=1.0, data_beta=0.0, kl_beta=0.0, loss_scale=1.0, **inputs)
    assert no_kl.item() == pytest.approx(_policy_reference(inputs), rel=1e-5)


def test_ddrl_loss_term_weights_route_gradients():
    """A zero-weight term contributes no gradient; a weighted term contributes weight * d(term)."""
    inputs = _loss_inputs()
    data_loss = inputs.pop("data_loss").clone().requires_grad_(True)
    kl = inputs.pop("kl").clone().requires_grad_(True)
    loss, _ = ddrl_loss(policy_weight=1.0, data_beta=0.0, kl_beta=0.25, loss_scale=4.0,
                        data_loss=data_loss, kl=kl, **inputs)
    loss.backward()
    assert data_loss.grad is None
    torch.testing.assert_close(kl.grad, torch.full((4,), 4.0 * 0.25 / 4))


def test_ddrl_loss_missing_terms_raise():
    """data_beta > 0 without data_loss, or kl_beta > 0 without kl, is an error."""
    inputs = _loss_inputs()
    inputs.pop("data_loss")
    with pytest.raises(ValueError, match="data_beta"):
        ddrl_loss(policy_weight=1.0, data_beta=0.01, kl_beta=0.0, loss_scale=1.0, **inputs)
    inputs.pop("kl")
    with pytest.raises(ValueError, match="kl_beta"):
        ddrl_loss(policy_weight=1.0, data_beta=0.0, kl_beta=0.1, loss_scale=1.0, **inputs)


def test_registry_lookup_and_errors():
    """get('loss', 'ddrl') is ddrl_loss; an unknown name lists the registered ones; no twins."""
    assert get("loss", "ddrl") is ddrl_loss
    assert get("advantage", "group_norm") is group_advantages
    assert "ddrl" in registry.available("loss")
    with pytest.raises(ValueError) as error:
        get("loss", "ppo_typo")
    assert "ppo_typo" in str(error.value) and "ddrl" in str(error.value)
    with pytest.raises(ValueError, match="none"):
        get("no_such_kind", "x")
    with pytest.raises(ValueError, match="twice"):
        registry.register("loss", "ddrl")(lambda: None)
