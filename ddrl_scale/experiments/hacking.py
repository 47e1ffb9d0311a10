"""`ddrl experiment hacking`: DDRL against Flow-GRPO-style and reward-only RL on a hackable reward.

From the shipped base model, the three methods run the same trainer with the same seeds, data,
rollouts and compute; they differ only in the loss weights (METHODS). Every `eval_every` steps each
run is measured on held-out prompts and held-out real videos (experiments/measures.py): reward,
data fit, within-prompt diversity and a feature Frechet distance to real videos (realism). The
report (JSON, PNG plots, markdown) goes to benchmarks/results/<date>-hacking/ by default.
"""

from __future__ import annotations

import datetime
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ddrl_scale.config import load_config
from ddrl_scale.data import synthetic
from ddrl_scale.data.anchor import pixels_to_video
from ddrl_scale.experiments.measures import (
    data_fit,
    frechet_distance,
    video_features,
    within_prompt_diversity,
)
from ddrl_scale.train.evaluate import evaluate
from ddrl_scale.train.trainer import Trainer

logger = logging.getLogger(__name__)

# the loss weights are the only difference between the methods
METHODS = {
    "ddrl": ["algo.data_beta=0.01", "algo.kl_beta=0.0"],
    "flow_grpo": ["algo.data_beta=0.0", "algo.kl_beta=0.04"],
    "reward_only": ["algo.data_beta=0.0", "algo.kl_beta=0.0"],
}
HELD_OUT_SEED, PROMPT_SEED = 777_001, 777_002  # apart from the training data (seed run.seed)
MEASURES = ("reward", "data_fit", "diversity", "realism_fd")


@dataclass
class Setting:
    seeds: int = 3
    steps: int = 40
    eval_every: int = 10
    eval_prompts: int = 8
    samples_per_prompt: int = 4
    held_out_videos: int = 128

    @classmethod
    def quick(cls) -> Setting:
        return cls(seeds=1, steps=2, eval_every=2, eval_prompts=2, samples_per_prompt=2,
                   held_out_videos=16)


class RecordingTrainer(Trainer):
    """A Trainer that keeps what its first rollout saw, to show the methods start alike."""

    first_rollout: dict | None = None

    def rollout(self, batch):
        rollouts = super().rollout(batch)
        if self.first_rollout is None:
            self.first_rollout = {"keys": list(batch.keys), "prompts": rollouts.prompts,
                                  "final": rollouts.trajectory.final.clone(),
                                  "rewards": rollouts.total_reward.clone()}
        return rollouts


def held_out(config, count: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Held-out real videos: latents, captions and their realism features."""
    video = config.video
    samples = list(synthetic.make_samples(count, HELD_OUT_SEED, video.num_frames, video.height,
                                          video.width))
    pixels = torch.stack([pixels_to_video(array) for _, array, _, _ in samples])
    return pixels * 2 - 1, [caption for _, _, caption, _ in samples], video_features(pixels)


def measure(trainer: Trainer, setting: Setting, prompts: list[str], data) -> dict[str, float]:
    latents, captions, real_features = data
    result = evaluate(trainer.velocity, trainer.encode_text, trainer.vae.decode, trainer.rewards,
                      prompts, setting.samples_per_prompt, trainer.latent_shape, trainer.sigmas,
                      PROMPT_SEED, trainer.device)
    out = {"reward": result.total.mean().item(),
           **{f"reward_{name}": value.mean().item() for name, value in result.rewards.items()},
           "data_fit": data_fit(trainer.velocity, latents.to(trainer.device),
                                trainer.encode_text(captions), HELD_OUT_SEED),
           "diversity": within_prompt_diversity(result.videos, setting.samples_per_prompt),
           "realism_fd": frechet_distance(video_features(result.videos), real_features)}
    return out


def run_one(method: str, seed: int, setting: Setting, overrides: list[str], data,
            prompts: list[str], out_dir: Path) -> dict:
    config = load_config(None, [*overrides, *METHODS[method], f"run.seed={seed}",
                                f"train.steps={setting.steps}", "train.eval_prompts=0",
                                "train.progress=false",
                                f"run.output_dir={out_dir / 'runs' / f'{method}_seed{seed}'}"])
    trainer = RecordingTrainer(config)
    history = [{"step": 0, **measure(trainer, setting, prompts, data)}]
    start = time.time()
    while trainer.step < setting.steps:
        trainer.iteration()
        if trainer.step % setting.eval_every == 0 or trainer.step == setting.steps:
            history.append({"step": trainer.step, **measure(trainer, setting, prompts, data)})
    logger.info("%s seed %d: %d steps in %.0f s, reward %.3f -> %.3f", method, seed, trainer.step,
                time.time() - start, history[0]["reward"], history[-1]["reward"])
    return {"method": method, "seed": seed, "history": history,
            "config": OmegaConf.to_container(OmegaConf.structured(config)),
            "first_rollout": trainer.first_rollout}


def summarize(runs: list[dict]) -> dict[str, dict[int, dict[str, tuple[float, float]]]]:
    """method -> step -> measure -> (mean, std over seeds)."""
    table: dict = {}
    for run in runs:
        for record in run["history"]:
            for key, value in record.items():
                if key != "step":
                    table.setdefault(run["method"], {}).setdefault(record["step"], {}).setdefault(
                        key, []).append(value)
    return {method: {step: {key: (float(torch.tensor(v).mean()),
                                  float(torch.tensor(v).std()) if len(v) > 1 else 0.0)
                            for key, v in measures.items()} for step, measures in steps.items()}
            for method, steps in table.items()}


def run_experiment(setting: Setting, overrides: list[str], out_dir: Path) -> dict:
    start = time.time()
    base = load_config(None, overrides)
    data = held_out(base, setting.held_out_videos)
    video = base.video
    prompts = [caption for _, _, caption, _ in synthetic.make_samples(
        setting.eval_prompts, PROMPT_SEED, video.num_frames, video.height, video.width)]
    runs = [run_one(method, seed, setting, overrides, data, prompts, out_dir)
            for seed in range(setting.seeds) for method in METHODS]
    return {"setting": setting.__dict__, "overrides": overrides, "runs": runs,
            "summary": summarize(runs), "seconds": round(time.time() - start, 1),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                       f"{torch.__version__}", "date": datetime.date.today().isoformat()}
