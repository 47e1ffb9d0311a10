"""Measures of generated videos that the rewards never see: data fit, diversity, realism.

- data fit: the policy's flow-matching loss on held-out real videos at fixed noise levels and fixed
  noise (lower = the model still describes the data);
- diversity: mean pairwise RMS distance between the videos generated for the same prompt;
- realism: the Frechet distance between Gaussian fits of simple video features of generated and of
  held-out real videos (as FID does with Inception features, Heusel et al. 2017; here hand-made
  features, since no pretrained network can be downloaded). The features are colour mean and
  spread, spatial and temporal gradient energy, high-frequency energy and object area.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddrl_scale.algo.losses import flow_matching_loss
from ddrl_scale.algo.noise import DATA_NOISE, keyed_normal
from ddrl_scale.algo.schedules import add_noise

FEATURES = ("mean_r", "mean_g", "mean_b", "pixel_std", "spatial_gradient", "temporal_change",
            "high_frequency", "object_area")


def video_features(videos: torch.Tensor) -> torch.Tensor:
    """(N, 3, T, H, W) in [0, 1] -> (N, 8) features, in the order of FEATURES."""
    videos = videos.float()
    mean_rgb = videos.mean(dim=(2, 3, 4))
    pixel_std = videos.std(dim=(1, 2, 3, 4))
    spatial = ((videos[..., 1:, :] - videos[..., :-1, :]).abs().mean(dim=(1, 2, 3, 4))
               + (videos[..., 1:] - videos[..., :-1]).abs().mean(dim=(1, 2, 3, 4)))
    temporal = (videos[:, :, 1:] - videos[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))
    laplacian = (4 * videos[..., 1:-1, 1:-1] - videos[..., :-2, 1:-1] - videos[..., 2:, 1:-1]
                 - videos[..., 1:-1, :-2] - videos[..., 1:-1, 2:]).abs().mean(dim=(1, 2, 3, 4))
    background = videos.flatten(3).median(dim=-1).values[..., None, None]  # per frame and channel
    area = ((videos - background).abs().amax(dim=1) > 0.15).float().mean(dim=(1, 2, 3))
    return torch.stack([mean_rgb[:, 0], mean_rgb[:, 1], mean_rgb[:, 2], pixel_std, spatial,
                        temporal, laplacian, area], dim=1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), in float64."""
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrt_psd(cov_a)
    cross = _sqrt_psd(root_a @ cov_b @ root_a)
    return float((mean_a - mean_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross))


def within_prompt_diversity(videos: torch.Tensor, samples_per_prompt: int) -> float:
    """Mean pairwise RMS distance between the samples of each prompt (prompt-major order)."""
    groups = videos.float().reshape(-1, samples_per_prompt, *videos.shape[1:]).flatten(2)
    distances = torch.cdist(groups, groups) / groups.shape[-1] ** 0.5  # (P, S, S)
    pairs = samples_per_prompt * (samples_per_prompt - 1)
    return float(distances.sum(dim=(1, 2)).mean() / pairs)


@torch.no_grad()
def data_fit(velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
             latents: torch.Tensor, text: torch.Tensor, seed: int,
             sigmas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> float:
    """Mean flow-matching loss on held-out latents (N, ...) at fixed sigmas and fixed noise."""
    losses = []
    for index, sigma in enumerate(sigmas):
        noise = keyed_normal(latents.shape[1:], range(latents.shape[0]), seed, DATA_NOISE, index,
                             device=latents.device)
        level = torch.full((latents.shape[0],), sigma, device=latents.device)
        v = velocity(add_noise(latents, noise, level), level, text)
        losses.append(flow_matching_loss(v, latents, noise).mean())
    return float(torch.stack(losses).mean())
