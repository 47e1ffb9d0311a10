"""Built-in rewards: caption alignment for the synthetic demo, plus simple pixel statistics.

Place in the data flow (docs/architecture.md): SDE rollouts -> decoded videos -> **rewards** ->
advantages. ``caption_alignment`` reads the vocabulary of ``ddrl_scale.data.synthetic``.

All take decoded videos, float ``(B, 3, T, H, W)`` with RGB in [0, 1], and return float32
``(B,)`` scores on the same device. Importing this module registers them (``ddrl_scale.rewards``
does so on import).
"""

from __future__ import annotations

import torch

from ddrl_scale.data.synthetic import COLORS, DIRECTIONS, parse_caption
from ddrl_scale.rewards.base import Reward, check_videos, register_reward

# Largest possible distance between two RGB colours in the unit cube.
_MAX_COLOR_DISTANCE = 3**0.5


@register_reward("caption_alignment")
class CaptionAlignmentReward(Reward):
    """How well a video matches the object colour and motion direction named in its caption.

    Uses the vocabulary of ``ddrl_scale.data.synthetic``. Per video:

    1. the background of each frame is the per-channel median of its border pixels;
    2. a soft foreground mask rises smoothly from 0 to 1 as a pixel's RGB distance from the
       background passes a threshold (transition width ``softness``): ``threshold``, or
       ``noise_multiple`` times the border pixels' median distance from the background if that
       is larger, so that noisy generated frames do not count their noise as object;
    3. colour part, in [0, 1]: ``1 - distance / sqrt(3)`` between the named colour and the mean
       foreground colour over all frames;
    4. direction part, in [-1, 1]: the mask centroid's displacement over the clip (slope of a
       least-squares line through the per-frame centroids, times ``T - 1``) projected on the
       named direction, divided by ``motion_fraction`` times the frame's extent along it, and
       squashed with tanh, so moving ``motion_fraction`` of the frame the right way scores 0.76
       and the wrong way -0.76;
    5. score: mean of the parts whose word the caption contains; 0 if it names neither.

    The score is continuous in the pixels, so videos of one prompt get distinct scores and
    group-normalised advantages carry signal.
    """

    def __init__(
        self,
        threshold: float = 0.15,
        softness: float = 0.03,
        noise_multiple: float = 2.5,
        motion_fraction: float = 0.25,
    ) -> None:
        if softness <= 0 or motion_fraction <= 0:
            raise ValueError("softness and motion_fraction must be positive")
        self.threshold = threshold
        self.softness = softness
        self.noise_multiple = noise_multiple
        self.motion_fraction = motion_fraction

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_videos(videos, prompts)
        videos = videos.float()
        targets = _caption_targets(prompts, videos.device)
        mask, distance, background = self._foreground(videos)

        color_score = self._color_score(videos, mask * distance, background, targets["color"])
        direction_score = self._direction_score(mask, targets["direction"])

        has_color, has_direction = targets["has_color"], targets["has_direction"]
        zero = torch.zeros_like(color_score)
        # where, not multiplication, so that a part that was not asked for cannot leak a NaN.
        total = torch.where(has_color, color_score, zero) + torch.where(
            has_direction, direction_score, zero
        )
        parts = has_color.float() + has_direction.float()
        return total / parts.clamp(min=1)

    def _foreground(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split ``videos`` ``(B, 3, T, H, W)`` into background and a soft foreground.

        Returns:
            ``(mask, distance, background)``: mask in (0, 1) and RGB distance from the background,
            both ``(B, T, H, W)``, and the background colour of each frame ``(B, 3, T)``.
        """
        border = torch.cat(
            [
                videos[..., 0, :],
                videos[..., -1, :],
                videos[..., 1:-1, 0],
                videos[..., 1:-1, -1],
            ],
            dim=-1,
        )  # (B, 3, T, number of border pixels)
        background = border.median(dim=-1).values  # (B, 3, T)
        distance = (videos - background[..., None, None]).norm(dim=1)
        noise = (border - background[..., None]).norm(dim=1).median(dim=-1).values  # (B, T)
        threshold = (self.noise_multiple * noise).clamp(min=self.threshold)[..., None, None]
        mask = torch.sigmoid((distance - threshold) / self.softness)
        return mask, distance, background

    @staticmethod
    def _color_score(
        videos: torch.Tensor, weights: torch.Tensor, background: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """``1 - |mean foreground colour - target| / sqrt(3)``, ``(B,)``.

        ``weights`` is ``mask * distance``: pixels far from the background are the ones the object
        covers fully, so anti-aliased edges (blends with the background) count less. A video with
        no foreground gets its background colour as the foreground colour.
        """
        empty_weight = 1e-3  # tiny next to any visible object (pixels x RGB distance)
        total_weight = weights.sum(dim=(1, 2, 3)) + empty_weight  # (B,)
        weighted_sum = (videos * weights[:, None]).sum(dim=(2, 3, 4))  # (B, 3)
        weighted_sum = weighted_sum + empty_weight * background.mean(dim=2)
        mean_color = weighted_sum / total_weight[:, None]
        return 1.0 - (mean_color - target).norm(dim=1) / _MAX_COLOR_DISTANCE

    def _direction_score(self, mask: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """tanh of the normalised centroid displacement along ``direction`` ``(B, 2)``, ``(B,)``."""
        batch, frames, height, width = mask.shape
        rows = torch.arange(height, device=mask.device, dtype=mask.dtype) + 0.5
        cols = torch.arange(width, device=mask.device, dtype=mask.dtype) + 0.5
        # Empty frames get a small pull to the frame centre instead of dividing by zero.
        mass = mask.sum(dim=(2, 3)) + 1e-6  # (B, T)
        centroid_row = ((mask.sum(dim=3) * rows).sum(dim=2) + 1e-6 * height / 2) / mass
        centroid_col = ((mask.sum(dim=2) * cols).sum(dim=2) + 1e-6 * width / 2) / mass
        centroids = torch.stack([centroid_row, centroid_col], dim=-1)  # (B, T, 2)

        if frames < 2:
            return torch.zeros(batch, device=mask.device)
        # A least-squares slope uses every frame, so one noisy frame moves it less than it would
        # move the first-to-last displacement.
        time = torch.arange(frames, device=mask.device, dtype=mask.dtype)
        time = time - time.mean()
        slope = (centroids * time[None, :, None]).sum(dim=1) / (time**2).sum()  # (B, 2)
        displacement = slope * (frames - 1)

        extent = torch.tensor([height, width], device=mask.device, dtype=mask.dtype)
        along = (displacement * direction).sum(dim=1)
        scale = self.motion_fraction * (direction.abs() * extent).sum(dim=1)
        return torch.tanh(along / scale.clamp(min=1e-6))  # no direction named: scale is 0


def _caption_targets(prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Named colour ``(B, 3)``, direction ``(B, 2)`` and boolean presence flags ``(B,)``."""
    colors, directions, has_color, has_direction = [], [], [], []
    for prompt in prompts:
        words = parse_caption(prompt)
        colors.append(COLORS.get(words["color"], (0.0, 0.0, 0.0)))
        directions.append(DIRECTIONS.get(words["direction"], (0, 0)))
        has_color.append(words["color"] is not None)
        has_direction.append(words["direction"] is not None)
    return {
        "color": torch.tensor(colors, dtype=torch.float32, device=device),
        "direction": torch.tensor(directions, dtype=torch.float32, device=device),
        "has_color": torch.tensor(has_color, dtype=torch.bool, device=device),
        "has_direction": torch.tensor(has_direction, dtype=torch.bool, device=device),
    }


@register_reward("brightness")
class BrightnessReward(Reward):
    """Mean pixel value over channels, frames and pixels, in [0, 1]; ignores the prompt.

    Deliberately hackable: a policy maximises it by washing every frame out to white, which makes
    it a test bed for reward hacking and for how well data regularisation resists it.
    """

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_videos(videos, prompts)
        return videos.float().mean(dim=(1, 2, 3, 4))


@register_reward("saturation")
class SaturationReward(Reward):
    """Mean over pixels of (largest minus smallest RGB channel), in [0, 1]; ignores the prompt.

    Deliberately hackable: a policy maximises it by painting everything in pure primaries.
    """

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_videos(videos, prompts)
        videos = videos.float()
        spread = videos.max(dim=1).values - videos.min(dim=1).values  # (B, T, H, W)
        return spread.mean(dim=(1, 2, 3))


@register_reward("colorfulness")
class ColorfulnessReward(Reward):
    """Hasler and Suesstrunk's colourfulness per frame, averaged over frames; ignores the prompt.

    With ``rg = R - G`` and ``yb = (R + G) / 2 - B`` over a frame's pixels (values in [0, 1]):
    ``sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)``. 0 for grey frames.
    Hackable like ``saturation``.
    """

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_videos(videos, prompts)
        red, green, blue = videos.float().flatten(3).unbind(dim=1)  # each (B, T, H * W)
        red_green = red - green
        yellow_blue = (red + green) / 2 - blue
        spread = red_green.var(dim=-1, unbiased=False) + yellow_blue.var(dim=-1, unbiased=False)
        offset = red_green.mean(dim=-1) ** 2 + yellow_blue.mean(dim=-1) ** 2
        per_frame = spread.sqrt() + 0.3 * offset.sqrt()  # (B, T)
        return per_frame.mean(dim=1)
