"""DDRL loss terms: the policy loss + data loss stage of the data flow, as pure tensor functions.

DDRL (arXiv 2512.04332) = clipped policy gradient on the policy's own SDE rollouts + data_beta x the
flow-matching loss on real data (forward KL to data) + optional kl_beta x reverse KL to a frozen
reference. Flow-GRPO is data_beta = 0, kl_beta > 0; SFT is policy_weight = 0: one code path.

Where the paper (and Flow-GRPO) and the authors' release (nvidia-cosmos/cosmos-rl) define a quantity
differently, `algo.preset` chooses: "paper" (the default) or "release". The functions that differ
take the algo section (`*, algo`) and say what each preset computes.
"""

from __future__ import annotations

import torch

from ddrl_scale.algo.registry import register
from ddrl_scale.runtime import upcast


def _mean_over_sample(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


def policy_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor, std: torch.Tensor, *,
                     algo) -> torch.Tensor:
    """log r (B,) of the importance ratio r = exp(log r); std (B,) is the transition std (sde_step's
    4th output), algo the config's algo section.

    paper: log_prob - old_log_prob (log-densities averaged over dims, as Flow-GRPO).
    release: -(mean((x' - mu)^2) - mean((x' - mu_old)^2)), the squared distances without the
    1 / (2 std^2) (cosmos-rl wfm_trainer.py `rl_training_step`, `log_prob_ratio = -(diff_current -
    diff_old)`, left so by a TODO there); with both means at one std that is 2 std^2 (paper's log r).
    """
    log_ratio = log_prob - old_log_prob.detach()
    if algo.preset == "release":
        return 2.0 * upcast(std).reshape(-1) ** 2 * log_ratio
    return log_ratio


def data_loss_weight(sigma: torch.Tensor, *, algo) -> torch.Tensor | None:
    """Per-sample weight (B,) of the data term's velocity loss at noise level t = sigma (B,), or None.

    paper: None (the plain flow-matching loss). release: t^2 + (1 - t)^2, which is the release's
    x0-prediction loss weighted (s^2 + 1) / s^2 with s = t / (1 - t) (cosmos-rl t2v_model.py
    `get_per_sigma_loss_weights`, sigma_data = 1) written for the velocity (x0 error = -t x velocity
    error); finite at t = 1 and t = 0.
    """
    if algo.preset != "release":
        return None
    t = upcast(sigma).reshape(-1)
    return t**2 + (1.0 - t) ** 2


def clipped_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
    log_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), r = exp(log_prob - old_log_prob) or, given,
    exp(log_ratio) (policy_log_ratio's); all (B,)."""
    if log_ratio is None:
        log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
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

    The true KL of one transition takes the transition std (sde_step's 4th output); the training
    penalty (`kl_penalty`) takes Flow-GRPO's scale instead.
    """
    return _mean_over_sample((upcast(ref_mean.detach()) - upcast(mean)) ** 2) / (2.0 * upcast(std) ** 2)


def kl_penalty(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, sigma: float,
               sigma_next: float, *, algo) -> torch.Tensor:
    """The reverse-KL term (B,) that algo.kl_beta weights; std (B,) is the transition std.

    paper: Flow-GRPO's kl_loss, mean((mu - mu_ref)^2) / (2 std_dev_t^2) with std_dev_t = a
    sqrt(sigma / (1 - sigma)) the SDE's noise scale *without* sqrt(-dt) (flow_grpo
    scripts/train_sd3.py, `kl_loss`; sd3_sde_with_logprob.py returns that std_dev_t), so Flow-GRPO's
    beta values carry over; it is |dt| times the transition KL.
    release: mean((mu_ref - mu)^2), unnormalised (cosmos-rl wfm_trainer.py `kl_loss`).
    """
    squared = _mean_over_sample((upcast(ref_mean.detach()) - upcast(mean)) ** 2)
    if algo.preset == "release":
        return squared
    noise_scale_sq = upcast(std).reshape(-1) ** 2 / (float(sigma) - float(sigma_next))
    return squared / (2.0 * noise_scale_sq)


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
    log_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss_scale * (policy_weight * policy + kl_beta * mean(kl) + data_beta * mean(data_loss)).

    Per-sample inputs are (B,); data_loss is over the data batch. A term whose weight is 0 is
    still reported in the metrics but adds nothing to the graph. log_ratio: the importance log-ratio
    (policy_log_ratio's) in place of log_prob - old_log_prob.
    """
    policy, stats = clipped_policy_loss(log_prob, old_log_prob, advantages, clip_eps, log_ratio)
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
