"""algo.preset=release: each quantity of the authors' release (cosmos-rl) computed here from its
definition, by hand, on random tensors, against the project's functions; and the Flow-GRPO KL scale.

The definitions come from cosmos-rl `cosmos_rl/policy/trainer/wfm_trainer.py` (`rl_training_step`:
the squared-distance log-ratio, the data term on the rollout's sigma and noise) and
`cosmos_rl/policy/model/wfm/models/t2v_model.py` (unbiased group std, the EDM loss weight), and from
flow_grpo `scripts/train_sd3.py` (kl_loss) with its `sd3_sde_with_logprob.py` (std_dev_t).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from ddrl_scale.algo.advantages import group_advantages
from ddrl_scale.algo.losses import data_loss_weight, kl_penalty, policy_log_ratio
from ddrl_scale.algo.samplers import sde_step
from ddrl_scale.algo.schedules import sigma_schedule
from ddrl_scale.config import ConfigError, load_config
from ddrl_scale.config.schema import AlgoSection

PAPER, RELEASE = AlgoSection(), AlgoSection(preset="release")


def _by_hand_advantages(rewards: list[float], group: int, exp: bool, clamp: float) -> list[float]:
    out = []
    for start in range(0, len(rewards), group):
        members = rewards[start:start + group]
        mean, std = statistics.fmean(members), statistics.stdev(members)  # stdev: the N - 1 std
        for value in members:
            advantage = (value - mean) / (std + 1e-4)
            if exp:
                advantage = -math.exp(-advantage)
            if clamp > 0:
                advantage = min(max(advantage, -clamp), clamp)
            out.append(advantage)
    return out


@pytest.mark.parametrize("group", [2, 4, 8])
@pytest.mark.parametrize("exp, clamp", [(False, 0.0), (False, 1.0), (True, 5.0)])
def test_release_advantages_use_the_unbiased_group_std(group, exp, clamp):
    rewards = torch.rand(3 * group, generator=torch.Generator().manual_seed(group), dtype=torch.float64)
    got = group_advantages({"r": rewards}, {"r": 1.0}, group, exp, clamp, unbiased_std=True)
    expected = _by_hand_advantages(rewards.tolist(), group, exp, clamp)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    if not exp and clamp == 0:  # the paper's population std is sqrt((G - 1) / G) of it
        paper = group_advantages({"r": rewards}, {"r": 1.0}, group, exp, clamp)
        ratio = (paper / got)[got.abs() > 1e-3]
        assert ratio.mean().item() == pytest.approx(math.sqrt(group / (group - 1)), rel=1e-3)


def test_release_log_ratio_is_the_unnormalised_squared_distance():
    generator = torch.Generator().manual_seed(3)
    x, v, v_old = (torch.randn(4, 2, 3, 5, generator=generator) for _ in range(3))
    v = v_old + 0.05 * v  # a policy near the old one
    sigma, sigma_next, a = 0.6, 0.45, 0.7
    prev, old_log_prob, _, _ = sde_step(v_old, x, sigma, sigma_next, a,
                                        noise=torch.randn(x.shape, generator=generator))
    _, log_prob, _, std = sde_step(v, x, sigma, sigma_next, a, prev_sample=prev)
    # the transition mean by the Flow-GRPO formula, written out
    std_t = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma

    def mean_of(velocity):
        return (x * (1 + std_t**2 * dt / (2 * sigma))
                + velocity * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt)

    dims = (1, 2, 3)
    expected = -(((prev - mean_of(v)) ** 2).mean(dims) - ((prev - mean_of(v_old)) ** 2).mean(dims))
    got = policy_log_ratio(log_prob, old_log_prob, std, algo=RELEASE)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    # paper: the difference of the Gaussian log-densities
    torch.testing.assert_close(policy_log_ratio(log_prob, old_log_prob, std, algo=PAPER),
                               log_prob - old_log_prob)
    # on-policy, both are exactly 0
    assert torch.equal(policy_log_ratio(log_prob, log_prob, std, algo=RELEASE), torch.zeros(4))


def test_release_data_weight_equals_the_x0_loss_weight():
    """Velocity loss x (t^2 + (1-t)^2) == x0-prediction loss x (s^2 + 1) / s^2, s = t / (1 - t)."""
    generator = torch.Generator().manual_seed(4)
    ts = torch.tensor([1.0, 0.99, 0.9, 0.7, 0.5, 0.3, 0.1, 0.05], dtype=torch.float64)
    x0, noise, v_pred = (torch.randn(len(ts), 6, generator=generator, dtype=torch.float64) for _ in range(3))
    weight = data_loss_weight(ts, algo=RELEASE)
    assert torch.isfinite(weight).all() and weight[0].item() == 1.0
    velocity_loss = weight * ((v_pred - (noise - x0)) ** 2).mean(1)
    inner = ts < 1  # s is infinite at t = 1, where the x0 form is not defined
    t = ts[inner]
    x_t = (1 - t[:, None]) * x0[inner] + t[:, None] * noise[inner]
    x0_pred = x_t - t[:, None] * v_pred[inner]
    s = t / (1 - t)
    x0_loss = (s**2 + 1) / s**2 * ((x0_pred - x0[inner]) ** 2).mean(1)
    torch.testing.assert_close(velocity_loss[inner], x0_loss, rtol=1e-9, atol=1e-12)
    assert data_loss_weight(ts, algo=PAPER) is None


@pytest.mark.parametrize("num_steps", [4, 10])
def test_kl_penalty_equals_flow_grpo_kl_loss(num_steps):
    """Flow-GRPO: mean(((mu - mu_ref)^2).mean(dims) / (2 std_dev_t^2)), std_dev_t = a sqrt(sigma /
    (1 - sigma)) with sigma_max = sigmas[1] in the denominator at sigma = 1; no sqrt(-dt)."""
    sigmas = sigma_schedule(num_steps).tolist()
    generator = torch.Generator().manual_seed(num_steps)
    a = 0.7
    for index in (0, num_steps // 2, num_steps - 1):
        sigma, sigma_next = sigmas[index], sigmas[index + 1]
        x, v, v_ref = (torch.randn(3, 2, 4, generator=generator) for _ in range(3))
        _, _, mean, std = sde_step(v, x, sigma, sigma_next, a)
        _, _, ref_mean, _ = sde_step(v_ref, x, sigma, sigma_next, a)
        denominator = 1 - (sigmas[1] if sigma == 1 else sigma)
        std_dev_t = math.sqrt(sigma / denominator) * a
        expected = ((mean - ref_mean) ** 2).mean(dim=(1, 2)) / (2 * std_dev_t**2)
        got = kl_penalty(mean, ref_mean, std, sigma, sigma_next, algo=PAPER)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
        release = kl_penalty(mean, ref_mean, std, sigma, sigma_next, algo=RELEASE)
        torch.testing.assert_close(release, ((ref_mean - mean) ** 2).mean(dim=(1, 2)))


def test_preset_config_values_and_errors(tmp_path):
    assert load_config(None, []).algo.preset == "paper"
    assert load_config(None, ["algo.preset=paper"]).algo == AlgoSection()
    config = load_config(None, ["algo.preset=release"])
    assert config.algo.data_reuse_rollout_noise is True
    path = tmp_path / "run.yaml"
    path.write_text("algo:\n  preset: release\n")
    assert load_config(path).algo.data_reuse_rollout_noise is True
    with pytest.raises(ConfigError, match="algo.preset"):
        load_config(None, ["algo.preset=cosmos"])


def test_release_data_term_uses_each_members_own_rollout_noise(tiny_overrides):
    """Under release the data term covers all P * G rollout samples: member j of group p on group
    p's anchor x0, at the trained step's t, with member j's own initial noise and text, weighted."""
    from ddrl_scale.train.trainer import Trainer

    trainer = Trainer(load_config(None, [*tiny_overrides, "algo.preset=release"]))
    batch = trainer.next_batch()
    rollouts = trainer.rollout(batch)
    index = trainer.trained_steps()[1]
    got = trainer.data_loss(batch, rollouts, index).detach()
    group = trainer.config.algo.group_size
    noise = rollouts.trajectory.initial_noise
    assert got.shape == (noise.shape[0],) and not torch.equal(noise[0], noise[1])
    t = float(trainer.sigmas[index])
    for member in range(noise.shape[0]):
        x0 = batch.latents[member // group]
        x_t = (1 - t) * x0 + t * noise[member]
        with torch.no_grad():
            v = trainer.engine.model(x_t[None], torch.tensor([t]), rollouts.text[member:member + 1])[0]
        expected = (t**2 + (1 - t) ** 2) * ((v - (noise[member] - x0)) ** 2).mean()
        torch.testing.assert_close(got[member], expected, rtol=1e-5, atol=1e-7)


def test_random_trained_steps_are_drawn_without_replacement_from_the_rest():
    from ddrl_scale.algo.steps import step_plan

    algo = AlgoSection(train_timestep_stride=3, train_random_steps=3)
    fixed = (0, 3, 6, 9)
    draws = [step_plan(algo, 10, seed=7, iteration=it).steps for it in range(20)]
    for steps in draws:
        assert steps[:4] == fixed and len(steps) == 7 and len(set(steps)) == 7
        assert not set(steps[4:]) & set(fixed) and all(0 <= index < 10 for index in steps)
    assert len({steps[4:] for steps in draws}) > 5  # they change from iteration to iteration
    # keyed by (seed, iteration): the same again, with no RNG state
    assert step_plan(algo, 10, seed=7, iteration=3).steps == draws[3]
    assert [step_plan(algo, 10, seed=8, iteration=it).steps for it in range(20)] != draws  # and by seed
    assert step_plan(AlgoSection(train_timestep_stride=3), 10, seed=7, iteration=3).steps == fixed
    with pytest.raises(ConfigError, match="algo.train_random_steps"):
        step_plan(AlgoSection(train_timestep_stride=3, train_random_steps=7), 10)
    with pytest.raises(ConfigError, match="algo.train_random_steps"):
        load_config(None, ["algo.train_random_steps=-1"])


def test_random_trained_steps_resume_exactly(tiny_overrides, tmp_path):
    """2 steps then a resume to 4 == 4 steps in one go, with random trained steps on."""
    from ddrl_scale.train.metrics import read_metrics
    from ddrl_scale.train.run import run_training

    extra = [*tiny_overrides, "train.eval_prompts=0", "algo.train_random_steps=1"]
    run_training(load_config(None, [*extra, f"run.output_dir={tmp_path / 'a'}", "train.steps=4"]))
    run_training(load_config(None, [*extra, f"run.output_dir={tmp_path / 'b'}", "train.steps=2"]))
    run_training(load_config(None, [*extra, f"run.output_dir={tmp_path / 'b'}", "train.steps=4",
                                    "train.resume=auto"]))
    a, b = (read_metrics(tmp_path / name / "metrics.jsonl") for name in "ab")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    assert [r["policy_loss"] for r in a] == [r["policy_loss"] for r in b]


def test_caption_dropout_replaces_captions_by_the_empty_prompt(tiny_overrides):
    from ddrl_scale.train.trainer import Trainer

    trainer = Trainer(load_config(None, [*tiny_overrides, "algo.data_caption_dropout=0.5"]))
    prompts = [f"caption {i}" for i in range(64)]
    text = trainer.encode_text(prompts)
    empty = trainer.encode_text([""])[0]
    out = trainer.drop_captions(text, list(range(64)), index=0)
    dropped = [torch.equal(row, empty) for row in out]
    kept = [torch.equal(row, original) for row, original in zip(out, text)]
    assert all(d or k for d, k in zip(dropped, kept))
    assert 16 < sum(dropped) < 48  # about half, and the same draw again
    assert torch.equal(trainer.drop_captions(text, list(range(64)), index=0), out)
    assert not torch.equal(trainer.drop_captions(text, list(range(64)), index=2), out)
    with pytest.raises(ConfigError, match="algo.data_caption_dropout"):
        load_config(None, ["algo.data_caption_dropout=1.0"])
