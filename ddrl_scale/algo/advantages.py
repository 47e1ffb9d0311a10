"""Group-normalised advantages: the rewards -> advantages stage of the data flow.

Samples are ordered group by group: sample index = prompt_index * group_size + member_index.
"""

from __future__ import annotations

import torch

from ddrl_scale.algo.registry import register


def fill_invalid(values: torch.Tensor, group_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(filled (N,), valid (N,) bool): each non-finite score (an invalid sample: its reward failed)
    replaced by the mean of its group's valid scores, as the authors' release does (cosmos-rl
    t2v_model.py `_sync_rewards_across_rollouts`). A group with no valid member is an error naming
    the reward: nothing in it can be ranked."""
    grouped = values.float().reshape(-1, group_size)
    valid = torch.isfinite(grouped)
    counts = valid.sum(dim=1)
    if bool((counts == 0).any()):
        groups = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"reward '{name}' failed (or was not finite) for every member of group(s) "
                         f"{groups[:8]} of {grouped.shape[0]}: see the warnings above for its errors")
    zeros = torch.zeros_like(grouped)
    means = torch.where(valid, grouped, zeros).sum(dim=1, keepdim=True) / counts[:, None]
    return torch.where(valid, grouped, means).reshape(-1), valid.reshape(-1)


@register("advantage", "group_norm")
def group_advantages(
    rewards: dict[str, torch.Tensor],
    weights: dict[str, float],
    group_size: int,
    exp_transform: bool = False,
    clamp: float = 5.0,
    eps: float = 1e-4,
    unbiased_std: bool = False,
) -> torch.Tensor:
    """Advantages (N,) from several rewards {name: (N,)} with weights {name: w}.

    Each reward is normalised within its group, A_k = (r - mean_group) / (std_group + eps) with the
    population std (Flow-GRPO; algo.preset=paper) or, unbiased_std, the (G - 1) std of torch.std
    (cosmos-rl t2v_model.py `_sync_rewards_across_rollouts`; algo.preset=release), then
    A = sum_k w_k A_k / sum_k |w_k|; optionally A <- -exp(-A); clamped to [-clamp, clamp]
    (clamp 0 turns clamping off). Non-finite rewards are invalid samples (`fill_invalid`): their
    term is 0 and their group's statistics use the group's valid mean in their place.
    """
    if not rewards:
        raise ValueError("group_advantages needs at least one reward")
    total_weight = sum(abs(weights[name]) for name in rewards)
    if total_weight == 0:
        raise ValueError("group_advantages: all reward weights are zero")
    advantage = None
    for name, values in rewards.items():
        if values.dim() != 1 or values.numel() % group_size:
            raise ValueError(f"reward '{name}': expected (N,) with N a multiple of group size "
                             f"{group_size}, got shape {tuple(values.shape)}")
        filled, valid = fill_invalid(values, group_size, name)
        grouped = filled.reshape(-1, group_size)
        normalised = (grouped - grouped.mean(dim=1, keepdim=True)) / (
            grouped.std(dim=1, unbiased=unbiased_std, keepdim=True) + eps)
        # an invalid member's advantage is exactly 0 (its filled value is the mean up to rounding)
        term = weights[name] * torch.where(valid, normalised.reshape(-1), 0.0)
        advantage = term if advantage is None else advantage + term
    advantage = advantage / total_weight
    if exp_transform:
        advantage = -torch.exp(-advantage)
    if clamp > 0:
        advantage = advantage.clamp(-clamp, clamp)
    return advantage
