"""Fixed-prompt evaluation: the same prompts and initial noise before and after post-training.

Uses the deterministic ODE sampler, so a change in the mean reward comes from the weights alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ddrl_scale.algo.samplers import sample
from ddrl_scale.config.schema import RunConfig
from ddrl_scale.data import synthetic
from ddrl_scale.rewards import WeightedRewards
from ddrl_scale.train.progress import counting


@dataclass
class EvalResult:
    prompts: list[str]  # (N,) = eval prompts x samples per prompt, prompt-major
    rewards: dict[str, torch.Tensor]
    total: torch.Tensor  # (N,)
    videos: torch.Tensor  # (N, 3, T, H, W) in [0, 1]

    def summary(self) -> dict:
        out = {"reward_mean": self.total.mean().item(), "num_samples": int(self.total.numel())}
        out.update({f"reward_{name}_mean": value.mean().item() for name, value in self.rewards.items()})
        return out


def eval_prompts(config: RunConfig) -> list[str]:
    train = config.train
    if train.eval_prompts_file:
        path = Path(train.eval_prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"train.eval_prompts_file: '{path}' does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return prompts[: train.eval_prompts]
    video = config.video
    return [text for _, _, text, _ in synthetic.make_samples(
        train.eval_prompts, train.eval_seed, video.num_frames, video.height, video.width)]


@torch.no_grad()
def evaluate(velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
             encode_text: Callable[[list[str]], torch.Tensor],
             decode: Callable[[torch.Tensor], torch.Tensor], rewards: WeightedRewards,
             prompts: list[str], samples_per_prompt: int, latent_shape: tuple[int, ...],
             sigmas: torch.Tensor, seed: int, device: torch.device, progress: str = "") -> EvalResult:
    """progress: the label of a bar over the denoising steps (none when empty)."""
    expanded = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((len(expanded), *latent_shape), generator=generator, device=device)
    text = encode_text(expanded)
    step, close = counting(lambda x, sigma: velocity(x, sigma, text), len(sigmas) - 1, progress,
                           enabled=bool(progress))
    try:
        trajectory = sample(step, noise, sigmas, kind="ode")
    finally:
        close()
    videos = decode(trajectory.final)
    scores = rewards(videos, expanded)
    return EvalResult(expanded, scores, rewards.total(scores), videos)
