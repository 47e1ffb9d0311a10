"""Captioned moving-shape videos: the demo's anchor data and the caption reward's vocabulary.

This is the embedded demo dataset. It is the source of the demo's anchor data (anchor shards ->
loader -> data loss) and of the vocabulary that the built-in ``caption_alignment`` reward parses
(``ddrl_scale.rewards.builtin``). Everything here is numpy only and deterministic in its seed.

A clip shows a single object (a square, circle or triangle of one of ``COLORS``) that moves in a
straight line at constant speed in one of ``DIRECTIONS`` over one of ``BACKGROUNDS``. Its caption
names all four choices, e.g. ``"a red square moving left on a grey background"``.

Conventions used throughout:

* videos are ``uint8`` arrays of shape ``(T, H, W, 3)`` (frames, rows, columns, RGB);
* positions are in pixels, continuous: pixel ``(row, column)`` covers the square
  ``[row, row + 1) x [column, column + 1)``, so an object may sit at sub-pixel positions;
* an object occupies the ``size x size`` box whose top-left corner is ``(top, left)``.

Edges are anti-aliased by supersampling the coverage of each pixel, which keeps the motion
visible and smooth even at the demo resolution of 8 frames of 16 x 16 pixels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

# Object colours, RGB in [0, 1]. Each is at least ~0.35 from every other one and at least ~0.6
# from every background, so a colour can be told apart after blurring or noise.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.90, 0.15, 0.90),
    "cyan": (0.10, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
}

# Background colours, RGB in [0, 1]; no name is shared with COLORS.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "grey": (0.50, 0.50, 0.50),
    "black": (0.05, 0.05, 0.05),
    "navy": (0.08, 0.10, 0.30),
}

SHAPES: tuple[str, ...] = ("square", "circle", "triangle")

# Unit step per frame as (row change, column change): rows grow downwards, columns rightwards.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
}

# Spellings that parse_caption accepts for a vocabulary word.
_ALIASES: dict[str, str] = {"gray": "grey"}

DEFAULT_NUM_FRAMES = 8
DEFAULT_HEIGHT = 16
DEFAULT_WIDTH = 16

# Sub-samples per pixel side used to estimate how much of a pixel the object covers.
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class VideoSpec:
    """Everything needed to render one clip.

    Attributes:
        shape: one of ``SHAPES``.
        color: object colour, a key of ``COLORS``.
        direction: a key of ``DIRECTIONS``.
        background: a key of ``BACKGROUNDS``.
        size: side of the object's bounding box, pixels.
        start_y: row of the bounding box's top-left corner in frame 0, pixels (may be fractional).
        start_x: column of the bounding box's top-left corner in frame 0, pixels.
        speed: distance moved per frame along ``direction``, pixels per frame (>= 0).
    """

    shape: str
    color: str
    direction: str
    background: str
    size: int
    start_y: float
    start_x: float
    speed: float

    def __post_init__(self) -> None:
        for field, value, vocabulary in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, COLORS),
            ("direction", self.direction, DIRECTIONS),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in vocabulary:
                raise ValueError(f"unknown {field} {value!r}; expected one of {list(vocabulary)}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.speed < 0:
            raise ValueError(f"speed must be non-negative, got {self.speed}")

    def top_left(self, frame: int) -> tuple[float, float]:
        """Top-left corner ``(row, column)`` of the object's box in ``frame``, pixels."""
        step_y, step_x = DIRECTIONS[self.direction]
        return (
            self.start_y + step_y * self.speed * frame,
            self.start_x + step_x * self.speed * frame,
        )


def sample_spec(rng: np.random.Generator, height: int, width: int, num_frames: int) -> VideoSpec:
    """Draw a random clip whose object stays entirely inside the frame for ``num_frames`` frames.

    The object is about a third of the frame's shorter side (5 px at 16 x 16) and crosses 60-90%
    of the free room along its direction over the clip, so the motion is obvious.
    """
    size = max(2, round(min(height, width) / 3))
    if size >= min(height, width):
        raise ValueError(f"frame {height}x{width} is too small for a moving object")
    direction = str(rng.choice(list(DIRECTIONS)))
    step_y, step_x = DIRECTIONS[direction]
    moving_extent, across_extent = (width, height) if step_x else (height, width)

    room = moving_extent - size
    speed = rng.uniform(0.6, 0.9) * room / max(num_frames - 1, 1)
    travel = speed * (num_frames - 1)
    moving_forward = (step_x or step_y) > 0
    low, high = (0.0, room - travel) if moving_forward else (travel, float(room))
    start_along = rng.uniform(low, high)
    start_across = rng.uniform(0.0, across_extent - size)
    start_y, start_x = (start_across, start_along) if step_x else (start_along, start_across)

    return VideoSpec(
        shape=str(rng.choice(SHAPES)),
        color=str(rng.choice(list(COLORS))),
        direction=direction,
        background=str(rng.choice(list(BACKGROUNDS))),
        size=int(size),
        start_y=float(start_y),
        start_x=float(start_x),
        speed=float(speed),
    )


def caption(spec: VideoSpec) -> str:
    """The clip's caption, e.g. ``"a red square moving left on a grey background"``.

    The article before the colour is "an" for a vowel ("an orange circle ...").
    """
    article = "an" if spec.color[0] in "aeiou" else "a"
    return (
        f"{article} {spec.color} {spec.shape} moving {spec.direction} "
        f"on a {spec.background} background"
    )


def parse_caption(text: str) -> dict[str, str | None]:
    """Find the vocabulary words in a caption; a missing word maps to None.

    Case, punctuation and extra words are ignored. The object colour is the nearest ``COLORS``
    word before the shape word (without a shape word, the first colour word); the background is
    the ``BACKGROUNDS`` word just before "background". "gray" is read as "grey".

    Returns:
        ``{"color": ..., "shape": ..., "direction": ..., "background": ...}``.
    """
    words = [_ALIASES.get(word, word) for word in re.findall(r"[a-z]+", text.lower())]

    background = None
    if "background" in words:
        position = words.index("background")
        if position > 0 and words[position - 1] in BACKGROUNDS:
            background = words[position - 1]

    shape_index = next((i for i, word in enumerate(words) if word in SHAPES), None)
    if shape_index is None:
        candidates = range(len(words))
    else:
        candidates = range(shape_index - 1, -1, -1)  # nearest word before the shape first
    # COLORS and BACKGROUNDS share no word, so a background word is never taken for the object's.
    color = next((words[i] for i in candidates if words[i] in COLORS), None)

    return {
        "color": color,
        "shape": None if shape_index is None else words[shape_index],
        "direction": next((word for word in words if word in DIRECTIONS), None),
        "background": background,
    }


def _inside(
    shape: str, rows: np.ndarray, cols: np.ndarray, top: float, left: float, size: int
) -> np.ndarray:
    """Boolean mask of the sample points ``(rows, cols)`` that lie inside the object."""
    if shape == "square":
        return (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    if shape == "circle":
        radius = size / 2
        return (rows - top - radius) ** 2 + (cols - left - radius) ** 2 <= radius**2
    if shape == "triangle":
        # Apex at the top centre, base along the bottom edge of the box.
        depth = rows - top
        half_width = depth / 2
        return (depth >= 0) & (depth < size) & (np.abs(cols - left - size / 2) <= half_width)
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(spec: VideoSpec, frame: int, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel covered by the object in ``frame``, float64 ``(H, W)`` in [0, 1]."""
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    rows = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1, 1)
    cols = (np.arange(width)[:, None] + offsets[None, :]).reshape(1, -1)
    top, left = spec.top_left(frame)
    inside = _inside(spec.shape, rows, cols, top, left, spec.size)
    return inside.reshape(height, _SUPERSAMPLE, width, _SUPERSAMPLE).mean(axis=(1, 3))


def render(spec: VideoSpec, num_frames: int, height: int, width: int) -> np.ndarray:
    """Draw the clip: ``uint8`` array ``(num_frames, height, width, 3)``, RGB in [0, 255]."""
    background = np.asarray(BACKGROUNDS[spec.background], dtype=np.float64)
    foreground = np.asarray(COLORS[spec.color], dtype=np.float64)
    video = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for frame in range(num_frames):
        coverage = _coverage(spec, frame, height, width)[..., None]
        rgb = background * (1.0 - coverage) + foreground * coverage
        video[frame] = np.round(rgb * 255.0).astype(np.uint8)
    return video


def make_sample(
    rng: np.random.Generator,
    num_frames: int = DEFAULT_NUM_FRAMES,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
) -> tuple[np.ndarray, str, dict]:
    """Draw one clip.

    Returns:
        ``(video, caption, meta)``: video ``uint8 (T, H, W, 3)``, its caption, and the
        ``VideoSpec`` fields as plain JSON types (str, int, float).
    """
    spec = sample_spec(rng, height, width, num_frames)
    return render(spec, num_frames, height, width), caption(spec), asdict(spec)


def make_samples(
    num: int,
    seed: int,
    num_frames: int = DEFAULT_NUM_FRAMES,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
) -> Iterator[tuple[str, np.ndarray, str, dict]]:
    """Yield ``num`` clips as ``(key, video, caption, meta)``; keys are ``"%08d" % index``.

    Sample ``i`` depends only on ``(seed, i)``, so the first ``k`` samples do not change when
    ``num`` grows and shards can be generated independently.
    """
    for index in range(num):
        rng = np.random.default_rng([seed, index])
        video, text, meta = make_sample(rng, num_frames, height, width)
        yield f"{index:08d}", video, text, meta
