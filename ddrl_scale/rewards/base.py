"""Reward interface, name registry, and the weighted combination used by training.

Place in the data flow (docs/architecture.md): SDE rollouts -> decoded videos -> **rewards** ->
group-normalised advantages -> policy loss.

A reward scores decoded videos against the prompts they were generated from:

* ``videos``: float tensor ``(B, 3, T, H, W)`` (batch, RGB channels, frames, rows, columns),
  values in [0, 1];
* ``prompts``: ``list[str]`` of length ``B``;
* result: float32 tensor ``(B,)`` on the same device as ``videos``, higher is better.

Rewards are registered by name with ``@register_reward("name")`` so that configs can refer to
them as ``(name, weight, kwargs)`` entries, which ``WeightedRewards`` builds and combines.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

_REGISTRY: dict[str, type[Reward]] = {}
logger = logging.getLogger(__name__)


class Reward(abc.ABC):
    """Scores a batch of decoded videos against their prompts; subclasses set ``name``."""

    name: str = ""

    @abc.abstractmethod
    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score each video.

        Args:
            videos: float ``(B, 3, T, H, W)``, RGB values in [0, 1].
            prompts: the ``B`` prompts the videos were generated from.

        Returns:
            float32 ``(B,)`` scores on ``videos.device``; higher is better.
        """


def check_videos(videos: torch.Tensor, prompts: Sequence[str]) -> None:
    """Check that ``videos`` is float ``(B, 3, T, H, W)`` and there are ``B`` prompts.

    Raises:
        TypeError: ``videos`` is not a tensor, or ``prompts`` is a single string.
        ValueError: wrong number of dimensions or channels, integer dtype, or prompt count.
    """
    if not isinstance(videos, torch.Tensor):
        raise TypeError(f"videos must be a torch.Tensor, got {type(videos).__name__}")
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(
            f"videos must have shape (B, 3, T, H, W) with RGB channels second, "
            f"got {tuple(videos.shape)}"
        )
    if not videos.is_floating_point():
        raise ValueError(f"videos must be a float tensor in [0, 1], got dtype {videos.dtype}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got a single string")
    if len(prompts) != videos.shape[0]:
        raise ValueError(
            f"got {videos.shape[0]} videos but {len(prompts)} prompts; need one prompt per video"
        )


def register_reward(name: str) -> Callable[[type[Reward]], type[Reward]]:
    """Class decorator: register a ``Reward`` subclass under ``name`` and set its ``name``."""

    def decorate(cls: type[Reward]) -> type[Reward]:
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise TypeError(f"@register_reward({name!r}) must decorate a Reward subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"reward name {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_rewards() -> list[str]:
    """Sorted names of all registered rewards."""
    return sorted(_REGISTRY)


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward registered as ``name`` with ``kwargs``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; known rewards: {available_rewards()}")
    return _REGISTRY[name](**kwargs)


class WeightedRewards:
    """Several named rewards and their weights; the training signal is their weighted sum.

    A reward that raises, or returns a non-finite score, marks those samples invalid (NaN in the
    scores) instead of stopping the run; `algo.advantages.fill_invalid` then gives each invalid
    member its group's mean of the valid scores, as the authors' release does.

    Args:
        entries: non-empty list of ``(name, weight, kwargs)``: a registered reward name, a finite
            weight, and the keyword arguments for its constructor (``None`` means none). Each name
            may appear once, since scores are reported per name.
        transforms: optional ``{name: (scale, clip)}``: each finite score is clamped to ``clip``
            ``(low, high)`` (None: not clamped), then multiplied by ``scale`` (the release's
            per-reward ``reward_clip_min/max`` and ``scale``).
    """

    def __init__(self, entries: Sequence[tuple[str, float, Mapping[str, Any] | None]],
                 transforms: Mapping[str, tuple[float, tuple[float, float] | None]] | None = None
                 ) -> None:
        if len(entries) == 0:
            raise ValueError("WeightedRewards needs at least one (name, weight, kwargs) entry")
        self._rewards: dict[str, Reward] = {}
        self._weights: dict[str, float] = {}
        for index, entry in enumerate(entries):
            name, weight, kwargs = self._validate_entry(index, entry)
            self._rewards[name] = build_reward(name, **kwargs)
            self._weights[name] = weight
        self._transforms = dict(transforms or {})
        unknown = sorted(set(self._transforms) - set(self._rewards))
        if unknown:
            raise ValueError(f"reward transforms for {unknown}, which are not among {sorted(self._rewards)}")

    @classmethod
    def from_specs(cls, specs: Sequence[Any]) -> WeightedRewards:
        """From the config's `rewards` list (RewardSpec: name, weight, args, scale, clip)."""
        transforms = {spec.name: (float(spec.scale), tuple(spec.clip) if spec.clip else None)
                      for spec in specs}
        return cls([(spec.name, spec.weight, dict(spec.args)) for spec in specs], transforms)

    def _validate_entry(self, index: int, entry: Any) -> tuple[str, float, dict[str, Any]]:
        where = f"reward entry {index} {entry!r}"
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise ValueError(f"{where}: expected a (name, weight, kwargs) triple")
        name, weight, kwargs = entry
        if name not in _REGISTRY:
            raise ValueError(
                f"{where}: unknown reward {name!r}; known rewards: {available_rewards()}"
            )
        if name in self._weights:
            raise ValueError(f"{where}: reward {name!r} is listed more than once")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"{where}: weight must be a number, got {type(weight).__name__}")
        if not math.isfinite(weight):
            raise ValueError(f"{where}: weight must be finite, got {weight}")
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"{where}: kwargs must be a mapping, got {type(kwargs).__name__}")
        return name, float(weight), dict(kwargs)

    @property
    def weights(self) -> dict[str, float]:
        """Weight of each reward, by name (a copy)."""
        return dict(self._weights)

    @property
    def rewards(self) -> dict[str, Reward]:
        """The built rewards, by name (a copy of the mapping)."""
        return dict(self._rewards)

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Score ``videos`` (float ``(B, 3, T, H, W)`` in [0, 1]) with every reward.

        Returns:
            one float32 ``(B,)`` tensor per reward name, unweighted.
        """
        check_videos(videos, prompts)
        batch = videos.shape[0]
        scores = {}
        for name, reward in self._rewards.items():
            try:
                score = reward(videos, prompts)
            except Exception as error:  # a failed model or a dead server: those samples are invalid
                logger.warning("reward %r failed on %d samples (%s: %s); they count as invalid",
                               name, batch, type(error).__name__, error)
                score = torch.full((batch,), float("nan"), device=videos.device)
            if score.shape != (batch,):
                raise ValueError(
                    f"reward {name!r} returned shape {tuple(score.shape)}, expected ({batch},)"
                )
            scores[name] = self._transform(name, score.float())
        return scores

    def _transform(self, name: str, score: torch.Tensor) -> torch.Tensor:
        score = torch.where(torch.isfinite(score), score, torch.full_like(score, float("nan")))
        if name not in self._transforms:
            return score
        scale, clip = self._transforms[name]
        if clip is not None:
            score = score.clamp(clip[0], clip[1])  # NaN stays NaN
        return score * scale

    def total(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of per-reward scores as returned by ``__call__``: float32 ``(B,)``."""
        missing = [name for name in self._weights if name not in scores]
        if missing:
            raise ValueError(f"scores lack rewards {missing}; got {sorted(scores)}")
        return sum(weight * scores[name].float() for name, weight in self._weights.items())
