"""Failed rewards (issues 19 and 22: one mechanism) and per-reward scale and clip.

A reward that raises or returns a non-finite score marks those samples invalid; an invalid member
gets its group's mean of the valid rewards, so its advantage is exactly 0, and the run goes on with
`reward_valid_rate` in the metrics. A group with no valid member stops with the reward named.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from ddrl_scale.algo.advantages import fill_invalid, group_advantages
from ddrl_scale.config import ConfigError, load_config
from ddrl_scale.rewards.base import Reward, WeightedRewards, register_reward


@register_reward("test_fails_on_odd_samples")
class FailsOnOddSamples(Reward):
    """Brightness, but NaN for every second video of the batch (one member of each pair)."""

    def __call__(self, videos, prompts):
        score = videos.float().mean(dim=(1, 2, 3, 4))
        odd = torch.arange(len(prompts)) % 2 == 1
        return torch.where(odd, torch.full_like(score, float("nan")), score)


@register_reward("test_always_raises")
class AlwaysRaises(Reward):
    def __call__(self, videos, prompts):
        raise ConnectionError("reward server unreachable")


def test_an_invalid_member_gets_advantage_zero_and_the_group_its_valid_mean():
    rewards = torch.tensor([0.1, float("nan"), 0.7, 0.5, 0.2, 0.9, float("inf"), 0.3])
    out = group_advantages({"r": rewards}, {"r": 1.0}, group_size=4, clamp=0.0)
    assert out[1].item() == 0.0 and out[6].item() == 0.0
    for start in (0, 4):  # by hand: the invalid one filled by the mean of the valid ones
        members = rewards[start:start + 4].tolist()
        valid = [value for value in members if math.isfinite(value)]
        filled = [value if math.isfinite(value) else statistics.fmean(valid) for value in members]
        mean, std = statistics.fmean(filled), statistics.pstdev(filled)
        for offset, value in enumerate(members):
            if math.isfinite(value):
                assert out[start + offset].item() == pytest.approx((value - mean) / (std + 1e-4),
                                                                 rel=1e-5, abs=1e-6)
    filled, valid = fill_invalid(rewards, 4, "r")
    assert valid.tolist() == [True, False, True, True, True, True, False, True]
    assert filled[1].item() == pytest.approx((0.1 + 0.7 + 0.5) / 3)


def test_a_group_without_valid_members_names_the_reward():
    rewards = torch.tensor([0.1, 0.2, float("nan"), float("nan")])
    with pytest.raises(ValueError, match="reward 'pickscore'.*group"):
        group_advantages({"pickscore": rewards}, {"pickscore": 1.0}, group_size=2)


def test_a_raising_reward_marks_its_samples_invalid(caplog):
    rewards = WeightedRewards([("brightness", 1.0, None), ("test_always_raises", 1.0, None)])
    videos = torch.rand(3, 3, 2, 4, 4)
    scores = rewards(videos, ["a", "b", "c"])
    assert torch.isnan(scores["test_always_raises"]).all()
    assert torch.isfinite(scores["brightness"]).all()
    assert "test_always_raises" in caplog.text and "unreachable" in caplog.text


def test_scale_and_clip_per_reward():
    from ddrl_scale.config.schema import RewardSpec

    specs = [RewardSpec(name="brightness", weight=1.0, scale=2.0, clip=[0.0, 0.3])]
    rewards = WeightedRewards.from_specs(specs)
    videos = torch.stack([torch.full((3, 2, 4, 4), value) for value in (0.1, 0.5)])
    scores = rewards(videos, ["a", "b"])["brightness"]
    torch.testing.assert_close(scores, torch.tensor([0.2, 0.6]))  # clamp to 0.3, then x 2
    with pytest.raises(ConfigError, match=r"rewards\[brightness\].clip"):
        load_config(None, ["rewards=[{name: brightness, clip: [1.0, 0.0]}]"])


def test_training_goes_on_with_failed_samples_and_logs_the_valid_rate(tiny_overrides):
    """A reward that is NaN for one member of every group: the run finishes, and logs the rates."""
    from ddrl_scale.train.metrics import read_metrics
    from ddrl_scale.train.run import run_training

    config = load_config(None, [*tiny_overrides, "train.eval_prompts=0", "train.steps=2",
                                "rewards=[{name: test_fails_on_odd_samples}, {name: brightness}]"])
    assert run_training(config)["steps"] == 2
    records = read_metrics(config.run.output_dir + "/metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["reward_test_fails_on_odd_samples_valid_rate"] == 0.5
        assert record["reward_brightness_valid_rate"] == 1.0
        assert record["reward_valid_rate"] == 0.75
        assert math.isfinite(record["reward_mean"]) and math.isfinite(record["policy_loss"])
