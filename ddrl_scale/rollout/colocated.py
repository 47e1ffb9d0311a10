"""Colocated rollouts: the trainer's own process samples its prompt groups, then scores them.

The prompts -> SDE rollouts -> rewards -> advantages stage of docs/architecture.md, run in the
trainer's process (the mode Flow-GRPO and DanceGRPO use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddrl_scale.algo.advantages import fill_invalid, group_advantages
from ddrl_scale.algo.edm import sample_edm_ab2, schedule_from
from ddrl_scale.algo.noise import ROLLOUT_INIT, ROLLOUT_STEP, keyed_normal
from ddrl_scale.algo.samplers import Trajectory, sample
from ddrl_scale.config.schema import AlgoSection, SamplerSection
from ddrl_scale.rewards import WeightedRewards


@dataclass
class RolloutBatch:
    """N = prompts x group_size samples, group by group (index = prompt * G + member)."""

    prompts: list[str]  # (N,)
    text: torch.Tensor  # (N, L, text_dim)
    trajectory: Trajectory
    videos: torch.Tensor  # (N, 3, T, H, W) decoded, in [0, 1]
    rewards: dict[str, torch.Tensor]  # name -> (N,), NaN for an invalid sample (its reward failed)
    total_reward: torch.Tensor  # (N,) weighted sum, invalid scores filled by their group's valid mean
    advantages: torch.Tensor  # (N,)
    policy_version: int


def initial_noise(sample_indices: list[int], group_size: int, shape: tuple[int, ...],
                  same_per_group: bool, seed: int, step: int, device: torch.device) -> torch.Tensor:
    """Starting noise (N, *shape) of the global samples `sample_indices`, keyed by (seed, step, index);
    with same_per_group every member of a group starts from its group's noise."""
    keys = [index // group_size for index in sample_indices] if same_per_group else sample_indices
    return keyed_normal(shape, keys, seed, ROLLOUT_INIT, step, int(same_per_group), device=device)


def sample_rollouts(
    velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    encode_text: Callable[[list[str]], torch.Tensor],
    prompts: list[str],
    latent_shape: tuple[int, ...],
    sigmas: torch.Tensor,
    sampler: SamplerSection,
    algo: AlgoSection,
    seed: int,
    step: int,
    first_prompt_index: int,
    device: torch.device,
    log_prob_fn: Callable[..., torch.Tensor] | None = None,
) -> tuple[list[str], torch.Tensor, Trajectory]:
    """Sample G = algo.group_size videos for each prompt with the SDE sampler: (expanded prompts,
    text embeddings, trajectory). The part that needs the policy's weights. log_prob_fn: the
    behaviour log-prob (the training step's kernel; default sde_step's).

    Prompt p of this batch is prompt first_prompt_index + p of the step's global batch: all noise
    is keyed by (seed, step, global sample index), so the split over ranks changes nothing.
    """
    group_size = algo.group_size
    expanded = [prompt for prompt in prompts for _ in range(group_size)]
    indices = list(range(first_prompt_index * group_size, (first_prompt_index + len(prompts)) * group_size))
    text = encode_text(expanded)
    noise = initial_noise(indices, group_size, latent_shape, algo.same_noise_per_group, seed, step,
                          device)
    def step_noise(i: int) -> torch.Tensor:
        return keyed_normal(latent_shape, indices, seed, ROLLOUT_STEP, step, i, device=device)

    if sampler.kind == "edm_ab2":  # the release sampler; the first state's churn is draw S
        trajectory = sample_edm_ab2(lambda x, t: velocity(x, t, text), noise, schedule_from(sampler),
                                    sampler.s_noise, step_noise, churn_noise=step_noise(len(sigmas) - 1))
    else:
        trajectory = sample(lambda x, sigma: velocity(x, sigma, text), noise, sigmas, kind="sde",
                            noise_level=sampler.noise_level, step_noise=step_noise,
                            log_prob_fn=log_prob_fn)
    return expanded, text, trajectory


def score_rollouts(decode: Callable[[torch.Tensor], torch.Tensor], rewards: WeightedRewards,
                   expanded: list[str], text: torch.Tensor, trajectory: Trajectory, algo: AlgoSection,
                   policy_version: int) -> RolloutBatch:
    """Decode the final latents, score them, normalise the advantages within each group. Needs no
    policy weights, so a rollout rank can run it while it samples the next batch."""
    videos = decode(trajectory.final)
    scores = rewards(videos, expanded)  # NaN where a reward failed (an invalid sample)
    advantages = group_advantages(scores, rewards.weights, algo.group_size, algo.exp_reward,
                                  algo.advantage_clamp, unbiased_std=algo.preset == "release")
    filled = {name: fill_invalid(values, algo.group_size, name)[0] for name, values in scores.items()}
    return RolloutBatch(expanded, text, trajectory, videos, scores, rewards.total(filled),
                        advantages, policy_version)


def generate_rollouts(
    velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    encode_text: Callable[[list[str]], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor],
    rewards: WeightedRewards,
    prompts: list[str],
    latent_shape: tuple[int, ...],
    sigmas: torch.Tensor,
    sampler: SamplerSection,
    algo: AlgoSection,
    seed: int,
    step: int,
    first_prompt_index: int,
    device: torch.device,
    log_prob_fn: Callable[..., torch.Tensor] | None = None,
) -> RolloutBatch:
    """Sample, decode, score and normalise: the whole rollout stage in one call (colocated).

    velocity(latents, sigma, text) is the policy; encode_text / decode are the text encoder and VAE.
    """
    expanded, text, trajectory = sample_rollouts(velocity, encode_text, prompts, latent_shape, sigmas,
                                                 sampler, algo, seed, step, first_prompt_index, device,
                                                 log_prob_fn)
    return score_rollouts(decode, rewards, expanded, text, trajectory, algo, step)
