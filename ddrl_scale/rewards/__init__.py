"""Rewards for RL post-training: the interface, the name registry and the built-in rewards.

See ``ddrl_scale.rewards.base`` for the conventions (videos float ``(B, 3, T, H, W)`` in [0, 1],
scores float32 ``(B,)``). Importing this package registers the built-in rewards and ``remote``
(a reward model served by ``ddrl reward-serve``, ``rewards/service``).
"""

from ddrl_scale.rewards import service  # noqa: F401  (registers the "remote" reward)
from ddrl_scale.rewards.base import (
    Reward,
    WeightedRewards,
    available_rewards,
    build_reward,
    check_videos,
    register_reward,
)
from ddrl_scale.rewards.builtin import (
    BrightnessReward,
    CaptionAlignmentReward,
    ColorfulnessReward,
    SaturationReward,
)

__all__ = [
    "BrightnessReward",
    "CaptionAlignmentReward",
    "ColorfulnessReward",
    "Reward",
    "SaturationReward",
    "WeightedRewards",
    "available_rewards",
    "build_reward",
    "check_videos",
    "register_reward",
]
