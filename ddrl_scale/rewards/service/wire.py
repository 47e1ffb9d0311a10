"""Wire format of the reward service: paths, constants, errors and the request body codec.

No pickle anywhere:

* ``POST /score``, header ``Authorization: Bearer <token>``, body = a safetensors buffer
  (``safetensors.torch.save``) with one tensor ``"videos"`` of shape ``(B, 3, T, H, W)`` and the
  metadata ``{"format": "ddrl-reward-request/1", "prompts": <JSON list of B strings>}``;
* answer ``200 {"scores": [B floats]}``, or an error status with ``{"error": message}``: 400 bad
  body (pixel values outside [0, 1] included), 401 missing or wrong token, 404 unknown path, 408
  the request did not arrive within the server's time limit, 411 no Content-Length, 413 body over
  the limit (checked from Content-Length before the body is read), 422 the reward refused the
  input (``ValueError``/``TypeError``), 500 the reward failed otherwise, 503 shutting down or all
  connection slots taken (``--max-connections``);
* ``GET /health`` (no token): the reward, limits and counters (requests scored, reward calls
  ("batches"), largest batch, refusals, requests in progress).

Wire dtypes (``RewardClient(wire_dtype=...)``): ``"float16"`` (the default: half the bytes of
float32, absolute error at most 2.5e-4 per pixel in [0, 1]), ``"uint8"`` (a quarter of the bytes;
values are clamped to [0, 1] and rounded to k/255, error at most 1/510, as when a video is saved)
or ``"float32"`` (exact). The server turns every dtype into float32 in [0, 1] before scoring, so
the remote score equals the in-process reward on ``decode_request(encode_request(videos))`` up to
float32 rounding of batched reductions.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

import safetensors.torch
import torch

from ddrl_scale.rewards.base import check_videos

SCORE_PATH = "/score"
HEALTH_PATH = "/health"
REQUEST_FORMAT = "ddrl-reward-request/1"
DEFAULT_TOKEN_ENV = "DDRL_REWARD_TOKEN"
MIN_TOKEN_LENGTH = 16
WIRE_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "float16": torch.float16,
    "float32": torch.float32,
}


class WireFormatError(ValueError):
    """A request body is not a valid reward request; the message says what was expected."""


class RewardServiceError(RuntimeError):
    """The reward service could not score; the message names the service URL and the cause."""


class RewardServiceAuthError(RewardServiceError):
    """The reward service refused the token (HTTP 401); never retried."""


class RewardServiceRequestError(RewardServiceError):
    """The reward service refused the request itself (HTTP 4xx other than 401); never retried."""


def encode_request(videos: torch.Tensor, prompts: Sequence[str], wire_dtype: str = "float16") -> bytes:
    """Serialise float ``(B, 3, T, H, W)`` videos in [0, 1] and their prompts to a request body.

    Raises:
        ValueError: bad shape or prompt count (``check_videos``), non-finite values, unknown
            ``wire_dtype``.
    """
    check_videos(videos, list(prompts))
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise TypeError("prompts must all be strings")
    videos = videos.detach()
    if not bool(torch.isfinite(videos).all()):
        raise ValueError("videos contain NaN or infinite values; a reward needs finite pixels in [0, 1]")
    if wire_dtype == "uint8":
        wire = (videos.float().clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        wire = videos.to(WIRE_DTYPES[wire_dtype])
    metadata = {"format": REQUEST_FORMAT, "prompts": json.dumps(list(prompts))}
    return safetensors.torch.save({"videos": wire.cpu().contiguous()}, metadata=metadata)


def _read_metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer: an 8-byte little-endian header length, then
    the JSON header (read directly because older safetensors cannot open a buffer)."""
    if len(body) < 8:
        raise WireFormatError(f"body of {len(body)} bytes is too short for a safetensors buffer")
    (header_length,) = struct.unpack("<Q", body[:8])
    if header_length > len(body) - 8:
        raise WireFormatError("body is not a safetensors buffer: its header runs past the end")
    try:
        header = json.loads(body[8 : 8 + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WireFormatError(f"body is not a safetensors buffer: bad header ({error})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise WireFormatError(f"safetensors metadata missing; expected format {REQUEST_FORMAT!r}")
    return metadata


def decode_request(body: bytes) -> tuple[torch.Tensor, list[str]]:
    """Parse a request body into the wire tensor ``(B, 3, T, H, W)`` (CPU) and its ``B`` prompts.

    The tensor keeps its wire dtype (uint8 / float16 / float32); ``wire_to_float`` converts it.

    Raises:
        WireFormatError: anything other than what ``encode_request`` writes.
    """
    metadata = _read_metadata(body)
    if metadata.get("format") != REQUEST_FORMAT:
        raise WireFormatError(
            f"metadata 'format' must be {REQUEST_FORMAT!r}, got {metadata.get('format')!r}"
        )
    try:
        prompts = json.loads(metadata.get("prompts", "null"))
    except json.JSONDecodeError as error:
        raise WireFormatError(f"metadata 'prompts' is not JSON: {error}") from None
    if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
        raise WireFormatError("metadata 'prompts' must be a JSON list of strings")
    try:
        tensors = safetensors.torch.load(body)
    except Exception as error:  # safetensors raises its own error types for a malformed buffer
        raise WireFormatError(f"body is not a valid safetensors buffer: {error}") from None
    if set(tensors) != {"videos"}:
        raise WireFormatError(f"expected exactly one tensor named 'videos', got {sorted(tensors)}")
    videos = tensors["videos"]
    if videos.dtype not in WIRE_DTYPES.values():
        raise WireFormatError(f"'videos' dtype must be uint8, float16 or float32, got {videos.dtype}")
    if videos.dim() != 5 or videos.shape[1] != 3 or videos.numel() == 0:
        raise WireFormatError(
            f"'videos' must have shape (B, 3, T, H, W) with B, T, H, W >= 1, got {tuple(videos.shape)}"
        )
    if len(prompts) != videos.shape[0]:
        raise WireFormatError(f"got {videos.shape[0]} videos but {len(prompts)} prompts")
    if videos.is_floating_point():
        if not bool(torch.isfinite(videos).all()):
            raise WireFormatError("'videos' contains NaN or infinite values")
        low, high = float(videos.min()), float(videos.max())
        if low < 0.0 or high > 1.0:
            raise WireFormatError(f"'videos' values must lie in [0, 1] (pixels), got min {low:.6g}, "
                                  f"max {high:.6g}")
    return videos, prompts


def wire_to_float(videos: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Wire tensor -> float32 in [0, 1] on ``device`` (uint8 is moved first: 4x fewer bytes)."""
    videos = videos.to(device)
    if videos.dtype == torch.uint8:
        return videos.float() / 255
    return videos.float()

