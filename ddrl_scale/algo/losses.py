"""DDRL loss terms: the policy loss + data loss stage of the data flow, as pure tensor functions.

DDRL (arXiv 2512.04332) = clipped policy gradient on the policy's own SDE rollouts + data_beta x the
flow-matching loss on real data (forward KL to data) + optional kl_beta x reverse KL to a frozen
reference. Flow-GRPO is data_beta = 0, kl_beta > 0; SFT is policy_weight = 0: one code path.
"""

from __future__ import annotations

import torch

from ddrl_scale.algo.registry import register
from ddrl_scale.runtime import upcast


def _mean_over_sample(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


def clipped_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), r = exp(log_prob - old_log_prob); all (B,)."""
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "ratio_mean": ratio.detach().mean(),
        "ratio_max_dev": (ratio.detach() - 1.0).abs().max(),
        "clip_fraction": ((ratio.detach() - 1.0).abs() > clip_eps).float().mean(),
    }
    return loss, stats


def flow_matching_loss(
    v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample loss (B,): mean over non-batch dims of w (v_pred - (noise - x0))^2, w (B,) or 1."""
    per_sample = _mean_over_sample((upcast(v_pred) - (upcast(noise) - upcast(x0))) ** 2)
    return per_sample if weight is None else upcast(weight) * per_sample


def reverse_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample KL (B,) between Gaussians of equal std: mean over dims of (mu_ref - mu)^2 / (2 std^2).

    std is the transition std that `sde_step` returns (std_t sqrt(-dt)), the same scale as
    Flow-GRPO's KL term, so kl_beta values carry over.
    """
    return _mean_over_sample((upcast(ref_mean.detach()) - upcast(mean)) ** 2) / (2.0 * upcast(std) ** 2)


@register("loss", "ddrl")
def ddrl_loss(
    *,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    policy_weight: float,
    data_beta: float,
    kl_beta: float,
    loss_scale: float,
    data_loss: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss_scale * (policy_weight * policy + kl_beta * mean(kl) + data_beta * mean(data_loss)).

    Per-sample inputs are (B,); data_loss is over the data batch. A term whose weight is 0 is
    still reported in the metrics but adds nothing to the graph.
    """
    policy, stats = clipped_policy_loss(log_prob, old_log_prob, advantages, clip_eps)
    total = policy_weight * policy if policy_weight else torch.zeros((), device=policy.device)
    stats["policy_loss"] = policy.detach()
    if data_loss is not None:
        data = data_loss.mean()
        stats["data_loss"] = data.detach()
        if data_beta:
            total = total + data_beta * data
    elif data_beta:
        raise ValueError("ddrl_loss: data_beta > 0 needs data_loss")
    if kl is not None:
        stats["kl"] = kl.detach().mean()
        if kl_beta:
            total = total + kl_beta * kl.mean()
    elif kl_beta:
        raise ValueError("ddrl_loss: kl_beta > 0 needs kl (a frozen reference model)")
    total = loss_scale * total
    stats["loss"] = total.detach()
    return total, stats
