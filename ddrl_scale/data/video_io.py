"""Video files <-> frame arrays with PyAV: decode, sample frames, resize and centre-crop.

Place in the data flow (docs/architecture.md): the first step of `ddrl data prepare` (mp4 -> frames
at the configured resolution and frame count -> VAE -> latent shards). `write_video` makes the small
real mp4 files of the tests and the benchmark.

Frame sampling: frames `0, stride, 2 * stride, ...` from the start of the stream, `num_frames` of
them; a video with fewer frames is an error (the sample is skipped and listed by `prepare`).
Resizing keeps the aspect ratio: the frame is scaled so that it covers the target size (bilinear,
antialiased, in torch), then centre-cropped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi")


class VideoDecodeError(ValueError):
    """A video could not be decoded into the requested frames; the message says why."""


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 (T, H, W, 3) at the target size
    source_size: tuple[int, int]  # (height, width) of the file's frames
    source_fps: float
    frame_indices: list[int]


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (T, h, w, 3) -> uint8 (T, height, width, 3): scale to cover, then centre-crop."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoDecodeError(f"expected frames (T, H, W, 3), got {frames.shape}")
    _, source_height, source_width, _ = frames.shape
    if (source_height, source_width) == (height, width):
        return frames.copy()
    scale = max(height / source_height, width / source_width)
    # round up so that the scaled frame always covers the target, whatever the float rounding
    scaled = (max(height, round(source_height * scale)), max(width, round(source_width * scale)))
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    video = F.interpolate(video, size=scaled, mode="bilinear", align_corners=False,
                          antialias=scaled[0] < source_height or scaled[1] < source_width)
    top, left = (scaled[0] - height) // 2, (scaled[1] - width) // 2
    video = video[:, :, top:top + height, left:left + width]
    return video.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def decode_video(source: str | Path | bytes, num_frames: int, height: int, width: int,
                 frame_stride: int = 1) -> DecodedVideo:
    """Decode `num_frames` frames (every `frame_stride`-th from the first) resized to (height, width).

    `source` is a file path or the file's bytes (a tar member). Raises VideoDecodeError for a file
    PyAV cannot open or decode, a file without a video stream, or too few frames.
    """
    import av  # PyAV: only `prepare` needs it

    if num_frames < 1 or frame_stride < 1:
        raise VideoDecodeError(f"num_frames and frame_stride must be >= 1, got {num_frames}, "
                               f"{frame_stride}")
    wanted = [index * frame_stride for index in range(num_frames)]
    if _is_empty(source):  # FFmpeg would call it "invalid data"; the truth is plainer
        raise VideoDecodeError("empty file (0 bytes)")
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    frames: list[np.ndarray] = []
    try:
        with av.open(handle) as container:
            if not container.streams.video:
                raise VideoDecodeError("the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            for position, frame in enumerate(container.decode(stream)):
                if position % frame_stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if len(frames) == num_frames:
                        break
    except VideoDecodeError:
        raise
    except Exception as error:  # PyAV/FFmpeg errors come in many types; all mean "cannot decode"
        raise VideoDecodeError(f"cannot decode video ({_reason(error)})") from None
    if len(frames) < num_frames:
        raise VideoDecodeError(f"video too short: {len(frames)} of the {num_frames} frames wanted "
                               f"(frame_stride {frame_stride})")
    array = np.stack(frames)
    return DecodedVideo(resize_crop(array, height, width), (array.shape[1], array.shape[2]), fps, wanted)


def _is_empty(source: str | Path | bytes) -> bool:
    if isinstance(source, bytes):
        return not source
    path = Path(source)
    return path.is_file() and path.stat().st_size == 0


def _reason(error: Exception) -> str:
    """FFmpeg's words for `error`, without the errno and the file name PyAV adds to them (the
    caller names the input; a tar member has no file name: PyAV says '<none>')."""
    words = getattr(error, "strerror", None)  # av.FFmpegError and OSError carry the message here
    return words if isinstance(words, str) and words else f"{type(error).__name__}: {error}"


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8, codec: str = "libx264",
                lossless: bool = True) -> Path:
    """Write uint8 (T, H, W, 3) frames as an mp4 with PyAV. `lossless` uses libx264 at crf 0 in
    yuv444p (bit-exact up to rounding), else yuv420p at the codec's default quality."""
    import av

    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video: expected uint8 frames (T, H, W, 3), got {frames.dtype} "
                         f"{frames.shape}")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        if lossless and codec == "libx264":
            stream.pix_fmt, stream.options = "yuv444p", {"crf": "0"}
        else:
            stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
