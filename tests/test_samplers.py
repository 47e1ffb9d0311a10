"""Samplers and schedules against independent float64 / torch.distributions references (DDRL.md)."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from ddrl_scale.algo.noise import keyed_normal
from ddrl_scale.algo.samplers import ode_step, sample, sde_step
from ddrl_scale.algo.schedules import add_noise, shift_timesteps, sigma_schedule


def _np_sde_mean_std(v, x, sigma, sigma_next, a, first_step_denominator=None):
    """DDRL.md Flow-GRPO SDE in float64 numpy: (mean, transition std) for scalar sigmas."""
    v, x = np.asarray(v, dtype=np.float64), np.asarray(x, dtype=np.float64)
    dt = sigma_next - sigma
    denominator = 1.0 - (first_step_denominator if first_step_denominator is not None else sigma)
    std_t = a * math.sqrt(sigma / denominator)
    mean = (x * (1.0 + std_t**2 * dt / (2.0 * sigma))
            + v * (1.0 + std_t**2 * (1.0 - sigma) / (2.0 * sigma)) * dt)
    return mean, std_t * math.sqrt(-dt)


def _inputs(shape=(3, 2, 4, 5), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_sde_log_prob_is_gaussian_log_density_of_sampled_point():
    """log_prob == Normal(mean, std).log_prob(x_next) averaged over the non-batch dims."""
    v, x = _inputs()
    x_next, log_prob, mean, std = sde_step(v, x, 0.6, 0.45, noise_level=0.7)
    reference = Normal(mean.double(), std.double().view(-1, 1, 1, 1)).log_prob(x_next.double())
    reference = reference.mean(dim=(1, 2, 3))
    assert log_prob.shape == (3,)
    torch.testing.assert_close(log_prob.double(), reference, rtol=1e-5, atol=1e-5)


def test_sde_mean_and_std_match_float64_equation():
    """mean and std equal a float64 numpy evaluation of the DDRL.md formula."""
    v, x = _inputs()
    sigma, sigma_next, a = 0.8, 0.55, 0.9
    _, _, mean, std = sde_step(v, x, sigma, sigma_next, noise_level=a)
    ref_mean, ref_std = _np_sde_mean_std(v.numpy(), x.numpy(), sigma, sigma_next, a)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std.numpy(), np.full(3, ref_std), rtol=1e-6)
    # hand value of the transition std: 0.9 * sqrt(0.8 / 0.2) * sqrt(0.25) = 0.9
    assert std[0].item() == pytest.approx(0.9, rel=1e-6)


def test_sde_sample_empirical_mean_and_std():
    """Over many draws, x_next - mean has mean ~0 and std ~ the returned transition std."""
    torch.manual_seed(1)
    x = torch.full((4, 50_000), 0.3)
    v = torch.full((4, 50_000), -1.2)
    x_next, _, mean, std = sde_step(v, x, 0.5, 0.3)
    ref_mean, ref_std = _np_sde_mean_std(-1.2, 0.3, 0.5, 0.3, 0.7)
    residual = (x_next - mean).double()
    assert residual.mean().abs().item() < 4 * ref_std / math.sqrt(x_next.numel())
    assert residual.std().item() == pytest.approx(ref_std, rel=1e-2)
    assert x_next.double().mean().item() == pytest.approx(float(ref_mean), abs=3e-3)
    assert std[0].item() == pytest.approx(ref_std, rel=1e-6)


def test_sde_float_sigma_equals_per_sample_tensor():
    """A float sigma gives the same result as a (B,) tensor of the same value; mixed levels work."""
    v, x = _inputs()
    noise = torch.randn_like(x)
    out_float = sde_step(v, x, 0.7, 0.5, noise=noise)
    out_tensor = sde_step(v, x, torch.full((3,), 0.7), torch.full((3,), 0.5), noise=noise)
    for a, b in zip(out_float, out_tensor):
        assert torch.equal(a, b)
    sigmas, sigmas_next = torch.tensor([0.9, 0.7, 0.3]), torch.tensor([0.8, 0.5, 0.1])
    _, _, mean, std = sde_step(v, x, sigmas, sigmas_next, noise=noise)
    for i in range(3):
        ref_mean, ref_std = _np_sde_mean_std(v[i].numpy(), x[i].numpy(), float(sigmas[i]),
                                             float(sigmas_next[i]), 0.7)
        np.testing.assert_allclose(mean[i].numpy(), ref_mean, rtol=1e-5, atol=1e-6)
        assert std[i].item() == pytest.approx(ref_std, rel=1e-5)


def test_sde_first_step_at_sigma_one_is_finite_and_uses_sigma_next():
    """At sigma = 1, std_t = a sqrt(1 / (1 - sigma_next)) (Flow-GRPO), so all outputs are finite."""
    v, x = _inputs()
    x_next, log_prob, mean, std = sde_step(v, x, 1.0, 0.9, noise_level=0.7)
    for value in (x_next, log_prob, mean, std):
        assert torch.isfinite(value).all()
    ref_mean, ref_std = _np_sde_mean_std(v.numpy(), x.numpy(), 1.0, 0.9, 0.7,
                                         first_step_denominator=0.9)
    # hand value: 0.7 * sqrt(1 / 0.1) * sqrt(0.1) = 0.7
    assert ref_std == pytest.approx(0.7)
    np.testing.assert_allclose(std.numpy(), np.full(3, ref_std), rtol=1e-6)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-5, atol=1e-6)


def test_sde_prev_sample_is_returned_unchanged_and_scored():
    """With prev_sample given, it comes back as is and log_prob is its Gaussian log-density."""
    v, x = _inputs()
    prev = torch.randn_like(x)
    out, log_prob, mean, std = sde_step(v, x, 0.4, 0.2, prev_sample=prev)
    assert torch.equal(out, prev)
    reference = Normal(mean.double(), std.double().view(-1, 1, 1, 1)).log_prob(prev.double())
    torch.testing.assert_close(log_prob.double(), reference.mean(dim=(1, 2, 3)), rtol=1e-5,
                               atol=1e-5)


def test_sde_bf16_inputs_give_fp32_outputs():
    """bf16 model outputs are upcast: every returned tensor is float32."""
    v, x = _inputs()
    outputs = sde_step(v.bfloat16(), x.bfloat16(), 0.5, 0.25)
    assert all(value.dtype == torch.float32 for value in outputs)
    assert ode_step(v.bfloat16(), x.bfloat16(), 0.5, 0.25).dtype == torch.float32
    # the mean is the fp32 formula evaluated on the bf16 values
    ref_mean, _ = _np_sde_mean_std(v.bfloat16().float().numpy(), x.bfloat16().float().numpy(),
                                   0.5, 0.25, 0.7)
    np.testing.assert_allclose(outputs[2].numpy(), ref_mean, rtol=1e-5, atol=1e-6)


def test_ode_step_is_euler():
    """ode_step == x + v (sigma_next - sigma), per sample."""
    v, x = _inputs()
    sigmas, sigmas_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.25, 0.0])
    out = ode_step(v, x, sigmas, sigmas_next)
    for i in range(3):
        expected = x[i].double() + v[i].double() * (float(sigmas_next[i]) - float(sigmas[i]))
        torch.testing.assert_close(out[i].double(), expected, rtol=1e-6, atol=1e-6)


def _straight_line_field(target):
    """v(x, s) = (x - c) / s: the exact velocity of the straight paths noise -> c."""
    def velocity_fn(x, sigma):
        return (x - target) / sigma.view(-1, *([1] * (x.dim() - 1)))
    return velocity_fn


def test_ode_sample_reaches_target_of_linear_field():
    """Euler on straight lines is exact: the ODE sampler lands on c from any noise."""
    target = torch.tensor([[1.5, -2.0, 0.25], [0.0, 3.0, -1.0]])
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
    sigmas = sigma_schedule(7, shift=3.0)
    trajectory = sample(_straight_line_field(target), noise, sigmas, kind="ode")
    assert trajectory.states.shape == (8, 2, 3)
    assert trajectory.log_probs is None and trajectory.means is None
    torch.testing.assert_close(trajectory.final, target, rtol=0, atol=1e-5)
    assert torch.equal(trajectory.initial_noise, noise)
    # every intermediate state lies on the line: x_s = (1 - s) c + s noise
    for state, s in zip(trajectory.states, trajectory.sigmas.tolist()):
        torch.testing.assert_close(state, (1 - s) * target + s * noise, rtol=0, atol=1e-5)


def test_sde_trajectory_shapes_and_on_policy_ratio_is_exactly_one():
    """S + 1 states, S log-probs; rescoring states[i+1] gives the behaviour log-prob bit-exactly."""
    steps = 5
    target = torch.randn(2, 3, 4)
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4))
    velocity_fn = _straight_line_field(target)
    sigmas = sigma_schedule(steps, shift=2.0)
    trajectory = sample(velocity_fn, noise, sigmas, kind="sde",
                        step_noise=lambda i: keyed_normal((3, 4), [0, 1], 5, i), record_means=True)
    assert trajectory.states.shape == (steps + 1, 2, 3, 4)
    assert trajectory.means.shape == (steps, 2, 3, 4)
    assert trajectory.log_probs.shape == (steps, 2)
    assert trajectory.states.dtype == trajectory.log_probs.dtype == torch.float32
    for i in range(steps):
        x = trajectory.states[i]
        sigma = torch.full((2,), float(sigmas[i]))
        v = velocity_fn(x, sigma)
        _, log_prob, mean, _ = sde_step(v, x, float(sigmas[i]), float(sigmas[i + 1]),
                                        prev_sample=trajectory.states[i + 1])
        assert torch.equal(log_prob, trajectory.log_probs[i]), f"step {i}: ratio != 1"
        assert torch.equal(mean, trajectory.means[i])
        assert torch.equal(torch.exp(log_prob - trajectory.log_probs[i]), torch.ones(2))


def test_sde_step_without_log_density_samples_the_same_point():
    """log_density=False (the rollouts' path when a fused kernel scores them) changes nothing but the
    missing log-prob; sample() keeps no means unless asked."""
    v, x, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    full = sde_step(v, x, 0.6, 0.4, noise=noise)
    bare = sde_step(v, x, 0.6, 0.4, noise=noise, log_density=False)
    assert bare[1] is None
    for got, want in zip((bare[0], bare[2], bare[3]), (full[0], full[2], full[3])):
        assert torch.equal(got, want)
    trajectory = sample(lambda x, s: torch.zeros_like(x), noise, sigma_schedule(3), kind="sde",
                        log_prob_fn=lambda v, x, prev, sigma, sigma_next, level: x.new_zeros(x.shape[0]))
    assert trajectory.means is None and trajectory.log_probs.shape == (3, 2)


def test_sample_rejects_unknown_kind():
    """An unknown sampler kind is an error, not a silent default."""
    with pytest.raises(ValueError, match="sde"):
        sample(lambda x, s: x, torch.zeros(1, 2), sigma_schedule(2), kind="heun")


def test_sigma_schedule_endpoints_monotone_and_dtype():
    """S + 1 float64 values from exactly 1 down to exactly 0, strictly decreasing, for any shift."""
    for shift in (1.0, 3.0, 5.0):
        sigmas = sigma_schedule(10, shift=shift)
        assert sigmas.shape == (11,) and sigmas.dtype == torch.float64
        assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
        assert (sigmas[1:] < sigmas[:-1]).all()
    np.testing.assert_allclose(sigma_schedule(4).numpy(), [1.0, 0.75, 0.5, 0.25, 0.0])


def test_shift_formula_hand_values():
    """t' = s t / (1 + (s - 1) t): s = 3 maps 0.5 -> 0.75 and 0.25 -> 0.5; s = 1 is the identity."""
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(shift_timesteps(t, 3.0).numpy(), [0.0, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(shift_timesteps(t, 1.0).numpy(), t.numpy())
    np.testing.assert_allclose(sigma_schedule(2, shift=3.0).numpy(), [1.0, 0.75, 0.0])


def test_add_noise_interpolates_per_sample():
    """x_sigma = (1 - sigma) x0 + sigma noise with a different sigma per sample."""
    x0, noise = _inputs()
    sigma = torch.tensor([0.0, 0.3, 1.0])
    out = add_noise(x0, noise, sigma)
    assert torch.equal(out[0], x0[0]) and torch.equal(out[2], noise[2])
    expected = 0.7 * x0[1].double() + 0.3 * noise[1].double()
    torch.testing.assert_close(out[1].double(), expected, rtol=1e-6, atol=1e-6)


def test_keyed_noise_depends_only_on_key_and_index():
    """A row of keyed_normal is the same whichever other indices are drawn with it."""
    together = keyed_normal((3,), [0, 1, 2, 3], 7, 1)
    split = torch.cat([keyed_normal((3,), [0, 1], 7, 1), keyed_normal((3,), [2, 3], 7, 1)])
    assert torch.equal(together, split)
    assert torch.equal(keyed_normal((3,), [2], 7, 1)[0], together[2])
    assert not torch.equal(keyed_normal((3,), [0], 7, 2)[0], together[0])  # another key differs
    assert not torch.equal(together[0], together[1])
