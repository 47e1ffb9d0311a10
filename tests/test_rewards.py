"""Tests for the reward interface, registry, weighted combination and built-in rewards."""

import math

import numpy as np
import pytest
import torch

from ddrl_scale.data.synthetic import COLORS, VideoSpec, caption, make_samples, render
from ddrl_scale.rewards import (
    Reward,
    WeightedRewards,
    available_rewards,
    base,
    build_reward,
    register_reward,
)

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _to_tensor(video: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (1, 3, T, H, W) in [0, 1]."""
    return torch.from_numpy(video).permute(3, 0, 1, 2)[None].float() / 255


def _demo_clips(num: int = 8):
    """(video tensor (1, 3, T, H, W), caption, meta) for the first ``num`` demo samples."""
    return [(_to_tensor(video), text, meta) for _, video, text, meta in make_samples(num, seed=11)]


# Two RGB pixels, one frame: (0.2, 0.4, 0.9) and (1.0, 0.5, 0.0); a second video all 0.25.
SMALL_VIDEOS = torch.tensor(
    [
        [[[[0.2, 1.0]]], [[[0.4, 0.5]]], [[[0.9, 0.0]]]],
        [[[[0.25, 0.25]]], [[[0.25, 0.25]]], [[[0.25, 0.25]]]],
    ]
)  # (B=2, C=3, T=1, H=1, W=2)
# By hand: mean of (0.2, 0.4, 0.9, 1.0, 0.5, 0.0) = 3.0 / 6; grey is 0.25.
SMALL_BRIGHTNESS = [0.5, 0.25]
# By hand: ((0.9 - 0.2) + (1.0 - 0.0)) / 2 = 0.85; grey has no spread.
SMALL_SATURATION = [0.85, 0.0]


def test_builtin_rewards_are_registered():
    assert {"caption_alignment", "brightness", "saturation", "colorfulness"} <= set(
        available_rewards()
    )
    assert build_reward("brightness").name == "brightness"


def test_brightness_and_saturation_by_hand():
    prompts = ["anything", "anything"]
    brightness = build_reward("brightness")(SMALL_VIDEOS, prompts)
    saturation = build_reward("saturation")(SMALL_VIDEOS, prompts)
    assert brightness.dtype == torch.float32 and brightness.shape == (2,)
    torch.testing.assert_close(brightness, torch.tensor(SMALL_BRIGHTNESS))
    torch.testing.assert_close(saturation, torch.tensor(SMALL_SATURATION))


def test_colorfulness_by_hand():
    scores = build_reward("colorfulness")(SMALL_VIDEOS, ["a", "b"])
    # rg = (-0.2, 0.5), yb = (-0.6, 0.75): std = (0.35, 0.675), mean = (0.15, 0.075).
    expected = math.hypot(0.35, 0.675) + 0.3 * math.hypot(0.15, 0.075)
    torch.testing.assert_close(scores, torch.tensor([expected, 0.0]))


def test_weighted_total_is_the_hand_weighted_sum():
    rewards = WeightedRewards([("brightness", 2.0, {}), ("saturation", -0.5, None)])
    scores = rewards(SMALL_VIDEOS, ["a", "b"])
    assert set(scores) == {"brightness", "saturation"}
    assert rewards.weights == {"brightness": 2.0, "saturation": -0.5}
    expected = [2.0 * b - 0.5 * s for b, s in zip(SMALL_BRIGHTNESS, SMALL_SATURATION)]
    torch.testing.assert_close(rewards.total(scores), torch.tensor(expected))


def test_unknown_reward_errors_name_it_and_list_known_ones():
    with pytest.raises(ValueError, match="no_such_reward") as error:
        build_reward("no_such_reward")
    assert "brightness" in str(error.value)
    with pytest.raises(ValueError, match="no_such_reward"):
        WeightedRewards([("brightness", 1.0, {}), ("no_such_reward", 1.0, {})])


@pytest.mark.parametrize(
    "entries, message",
    [
        ([], "at least one"),
        ([("brightness", float("nan"), {})], "finite"),
        ([("brightness", float("inf"), {})], "finite"),
        ([("brightness", 1.0)], "triple"),
        ([("brightness", 1.0, {}), ("brightness", 2.0, {})], "more than once"),
    ],
)
def test_weighted_rewards_rejects_bad_entries(entries, message):
    with pytest.raises(ValueError, match=message):
        WeightedRewards(entries)


def test_weighted_rewards_rejects_non_numeric_weight():
    with pytest.raises(TypeError, match="weight"):
        WeightedRewards([("brightness", "1.0", {})])


@pytest.mark.parametrize(
    "videos, prompts, error",
    [
        (torch.rand(2, 3, 4, 4), ["a", "b"], ValueError),  # no time axis
        (torch.rand(2, 4, 2, 4, 4), ["a", "b"], ValueError),  # RGBA
        (torch.rand(2, 2, 3, 4, 4), ["a", "b"], ValueError),  # channels last-but-one
        (torch.rand(2, 3, 2, 4, 4), ["a"], ValueError),  # one prompt short
        (torch.zeros(1, 3, 2, 4, 4, dtype=torch.uint8), ["a"], ValueError),  # not float
        (torch.rand(1, 3, 2, 4, 4), "a", TypeError),  # a string, not a list
    ],
)
def test_bad_batches_raise(videos, prompts, error):
    rewards = WeightedRewards([("brightness", 1.0, {}), ("caption_alignment", 1.0, {})])
    with pytest.raises(error):
        rewards(videos, prompts)
    with pytest.raises(error):
        build_reward("caption_alignment")(videos, prompts)


def test_register_reward_and_duplicate_names(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @register_reward("constant_for_test")
    class Constant(Reward):
        def __init__(self, value: float = 1.0) -> None:
            self.value = value

        def __call__(self, videos, prompts):
            return torch.full((videos.shape[0],), self.value)

    assert Constant.name == "constant_for_test"
    rewards = WeightedRewards([("constant_for_test", 3.0, {"value": 2.0})])
    scores = rewards(torch.rand(2, 3, 1, 2, 2), ["a", "b"])
    torch.testing.assert_close(rewards.total(scores), torch.tensor([6.0, 6.0]))
    with pytest.raises(ValueError, match="already registered"):
        register_reward("constant_for_test")(type("Other", (Constant,), {}))


def test_caption_alignment_prefers_the_true_colour():
    reward = build_reward("caption_alignment")
    for video, text, meta in _demo_clips():
        wrong = [
            text.replace(meta["color"], other, 1) for other in COLORS if other != meta["color"]
        ]
        scores = reward(video.expand(len(wrong) + 1, -1, -1, -1, -1), [text, *wrong])
        assert scores.dtype == torch.float32 and scores.shape == (len(wrong) + 1,)
        assert (scores[0] > scores[1:]).all(), (text, scores)


def test_caption_alignment_prefers_the_true_direction():
    reward = build_reward("caption_alignment")
    for video, text, meta in _demo_clips():
        wrong = text.replace(f" {meta['direction']} ", f" {OPPOSITE[meta['direction']]} ")
        right_score, wrong_score = reward(torch.cat([video, video]), [text, wrong])
        assert right_score > wrong_score + 0.5, text


def test_time_reversed_video_scores_lower_on_direction():
    reward = build_reward("caption_alignment")
    for video, _, meta in _demo_clips():
        direction_only = [f"something moving {meta['direction']}"]
        forward = reward(video, direction_only).item()
        backward = reward(video.flip(dims=[2]), direction_only).item()
        assert forward > 0.5 and backward < -0.5, (meta, forward, backward)


def test_caption_alignment_is_graded_not_all_or_nothing():
    reward = build_reward("caption_alignment")
    prompt = ["a red square moving right"]

    def score(speed: float) -> float:
        spec = VideoSpec("square", "red", "right", "grey", 5, 5.0, 1.0, speed)
        return reward(_to_tensor(render(spec, 8, 16, 16)), prompt).item()

    slow, medium, fast = score(0.1), score(0.5), score(1.4)
    assert slow < medium < fast < 1.0


def test_caption_alignment_without_colour_or_direction_words():
    reward = build_reward("caption_alignment")
    video, _, meta = _demo_clips(1)[0]
    assert reward(video, ["a video"]).item() == 0.0
    color_only = reward(video, [f"{meta['color']} stuff"]).item()
    assert 0.8 < color_only <= 1.0
    blank = torch.full((1, 3, 4, 16, 16), 0.5)
    assert torch.isfinite(reward(blank, ["a red square moving left"])).all()


def test_caption_alignment_keeps_the_device_and_batch_order():
    reward = build_reward("caption_alignment")
    clips = _demo_clips(3)
    videos = torch.cat([video for video, _, _ in clips])
    captions = [text for _, text, _ in clips]
    together = reward(videos, captions)
    alone = torch.cat([reward(video, [text]) for video, text, _ in clips])
    assert together.device == videos.device
    torch.testing.assert_close(together, alone)
    reward(videos.double(), captions)  # other float dtypes are accepted
    assert caption(VideoSpec(**clips[0][2])) == captions[0]


def test_caption_alignment_survives_mild_noise():
    # Generated videos are noisy: noise must not be mistaken for the object.
    reward = build_reward("caption_alignment")
    generator = torch.Generator().manual_seed(0)
    for video, text, meta in _demo_clips(4):
        noisy = (video + 0.05 * torch.randn(video.shape, generator=generator)).clamp(0, 1)
        direction_only = [f"moving {meta['direction']}"]
        assert reward(noisy, direction_only).item() > 0.5, text
        assert reward(noisy.flip(dims=[2]), direction_only).item() < -0.5, text
        clean_score = reward(video, [text]).item()
        assert reward(noisy, [text]).item() > clean_score - 0.15, text
