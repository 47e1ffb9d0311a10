"""Run artifacts a person looks at: reward / data-loss curves (PNG) and sample grids (GIF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ddrl_scale.storage.run_files import atomic_write_json
from ddrl_scale.train.metrics import read_metrics


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Reward and data loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records]
    figure, (reward_axis, data_axis) = plt.subplots(1, 2, figsize=(10, 3.5))

    def curve(axis, key: str, label: str, color: str) -> None:
        # the raw per-step values, faint, and their moving average over 5 steps
        values = [r[key] for r in records]
        smooth = [sum(values[max(0, i - 4): i + 1]) / len(values[max(0, i - 4): i + 1])
                  for i in range(len(values))]
        axis.plot(steps, values, color=color, alpha=0.25, linewidth=1)
        axis.plot(steps, smooth, color=color, label=label, linewidth=2)

    reward_keys = sorted(k for k in (records[0] if records else {})
                         if k.startswith("reward_") and k.endswith("_mean") and k != "reward_mean")
    colors = iter(["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"])
    if records:
        curve(reward_axis, "reward_mean", "total (weighted)", "tab:blue")
        for key in reward_keys:
            curve(reward_axis, key, key[7:-5], next(colors, "tab:gray"))
    reward_axis.set(xlabel="step", ylabel="rollout reward (mean; line: 5-step average)",
                    title="reward")
    reward_axis.legend(fontsize=8)
    if records and "data_loss" in records[0]:
        curve(data_axis, "data_loss", "data loss", "tab:red")
    data_axis.set(xlabel="step", ylabel="flow-matching loss on anchor data", title="data loss")
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return Path(out_path)


def video_grid(videos: torch.Tensor, columns: int, scale: int = 4, gap: int = 1) -> np.ndarray:
    """(N, 3, T, H, W) in [0, 1] -> uint8 frames (T, rows * H', columns * W', 3), upscaled."""
    count, _, frames, height, width = videos.shape
    rows = -(-count // columns)
    cell_h, cell_w = height * scale + gap, width * scale + gap
    grid = np.full((frames, rows * cell_h + gap, columns * cell_w + gap, 3), 255, dtype=np.uint8)
    pixels = (videos.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
    pixels = pixels.repeat(scale, axis=2).repeat(scale, axis=3)
    for index in range(count):
        top, left = gap + (index // columns) * cell_h, gap + (index % columns) * cell_w
        grid[:, top:top + height * scale, left:left + width * scale] = pixels[index]
    return grid


def save_gif(frames: np.ndarray, path: str | Path, frame_ms: int = 150) -> Path:
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return Path(path)


def labelled(frames: np.ndarray, label: str) -> np.ndarray:
    """uint8 frames (T, H, W, 3) under a white band holding `label` in black (widened to fit it)."""
    font = ImageFont.load_default()
    _, _, text_width, text_height = font.getbbox(label)
    band, width = text_height + 6, max(frames.shape[2], text_width + 8)
    header = Image.new("RGB", (width, band), "white")
    ImageDraw.Draw(header).text((4, 3), label, fill="black", font=font)
    out = np.full((frames.shape[0], band + frames.shape[1], width, 3), 255, dtype=np.uint8)
    out[:, :band] = np.asarray(header)
    out[:, band:, :frames.shape[2]] = frames
    return out


def before_after_gif(before: torch.Tensor, after: torch.Tensor, path: str | Path, columns: int = 8,
                     labels: tuple[str, str] | None = None) -> Path:
    """Two grids side by side, before on the left, after on the right, same prompts and noise;
    `labels` (before's, after's) go above them, so that nobody has to guess which side is which."""
    left, right = video_grid(before, columns), video_grid(after, columns)
    if labels is not None:
        left, right = labelled(left, labels[0]), labelled(right, labels[1])
    spacer = np.full((left.shape[0], left.shape[1], 8, 3), 255, dtype=np.uint8)
    return save_gif(np.concatenate([left, spacer, right], axis=2), path)


def write_json(data: dict, path: str | Path) -> Path:
    return atomic_write_json(path, data)
