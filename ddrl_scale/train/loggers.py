"""Optional experiment loggers next to metrics.jsonl: TensorBoard and Weights & Biases (both off by
default; `train.tensorboard`, `train.wandb_project`).

Place in the data flow (docs/architecture.md): beside train/metrics.py, rank 0 only. Each step the
trainer hands the same metrics dict it writes to metrics.jsonl (`log_metrics`); a run hands the
before/after evaluation videos once (`log_videos`). Videos are logged as a filmstrip image (one row
per sample, frames left to right) so that neither logger needs a video encoder (moviepy, ffmpeg).
"""

from __future__ import annotations

import logging
import math
import os
from numbers import Number
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def filmstrip(videos: torch.Tensor, max_videos: int = 8) -> np.ndarray:
    """videos (N, 3, T, H, W) float in [0, 1] -> uint8 image (min(N, max_videos) H, T W, 3)."""
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"log_videos expects videos (N, 3, T, H, W) in [0, 1], got {tuple(videos.shape)}")
    x = videos[:max_videos].detach().float().clamp(0, 1).cpu()
    count, channels, frames, height, width = x.shape
    image = x.permute(0, 3, 2, 4, 1).reshape(count * height, frames * width, channels)
    return (image * 255.0).round().to(torch.uint8).numpy()


def scalars(metrics: dict) -> dict[str, float]:
    """The finite numbers of a metrics dict (strings, lists and NaN are not plotted)."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, Number) and not isinstance(value, bool) and math.isfinite(float(value))}


class TensorBoardLogger:
    """Event files under `log_dir` (torch.utils.tensorboard; needs the `tensorboard` package)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("train.tensorboard=true needs the 'tensorboard' package "
                              "(pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_metrics(self, metrics: dict, step: int) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)

    def log_videos(self, tag: str, videos: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, filmstrip(videos), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run (needs `wandb`; honours WANDB_MODE, e.g. offline, as wandb does)."""

    def __init__(self, project: str, run_dir: str | Path, name: str = "", config: dict | None = None):
        try:
            import wandb
        except ImportError:
            raise ImportError(f"train.wandb_project={project!r} needs the 'wandb' package "
                              "(pip install wandb)") from None
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name or None, dir=str(run_dir), config=config or {},
                              resume="allow", id=os.environ.get("WANDB_RUN_ID"))

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(scalars(metrics), step=step)

    def log_videos(self, tag: str, videos: torch.Tensor, step: int) -> None:
        self.run.log({tag: self.wandb.Image(filmstrip(videos))}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLoggers:
    """Fans every call out to the enabled loggers; with none enabled every call does nothing."""

    def __init__(self, loggers: list | None = None):
        self.loggers = list(loggers or [])

    def log_metrics(self, metrics: dict, step: int) -> None:
        for item in self.loggers:
            item.log_metrics(metrics, step)

    def log_videos(self, tag: str, videos: torch.Tensor, step: int) -> None:
        for item in self.loggers:
            item.log_videos(tag, videos, step)

    def close(self) -> None:
        for item in self.loggers:
            item.close()


def build_loggers(run_dir: str | Path, tensorboard: bool = False, wandb_project: str = "",
                  name: str = "", config: dict | None = None, is_main: bool = True) -> RunLoggers:
    """The loggers a run asked for (rank 0 only; other ranks get an empty RunLoggers).
    TensorBoard writes to RUN_DIR/tensorboard, W&B keeps its files in RUN_DIR."""
    if not is_main:
        return RunLoggers()
    loggers: list = []
    if tensorboard:
        loggers.append(TensorBoardLogger(Path(run_dir) / "tensorboard"))
    if wandb_project:
        loggers.append(WandbLogger(wandb_project, run_dir, name, config))
    if loggers:
        logger.info("experiment loggers: %s", ", ".join(type(item).__name__ for item in loggers))
    return RunLoggers(loggers)
