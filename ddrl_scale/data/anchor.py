"""Anchor loader: shards -> batches of (latents, captions) for the data term and the prompts.

Reads the WebDataset shards of `data/shards.py` in a deterministic order per (seed, epoch) with a
seeded shuffle buffer, forever, epoch after epoch. Its position (epoch, samples taken in the epoch)
is saved in checkpoints; a restored loader replays the epoch's order and continues after the last
sample it gave. Every sample is checked by the sharded loader's checker (`sharded_split.check_sample`:
readable tar data, a decodable finite tensor, a caption, the shape of its index entry and of
`buckets` when given), and stored latents must have the run's `latent_shape` (a batch is one
tensor); bad samples, and the rest of a truncated shard, are skipped, logged with shard and key,
and counted, as in the sharded loader.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ddrl_scale.data import latent_shards as fmt

logger = logging.getLogger(__name__)


@dataclass
class AnchorBatch:
    latents: torch.Tensor  # (B, C, T, H, W)
    captions: list[str]
    keys: list[str]
    text: torch.Tensor | None = None  # (B, L, D) caption embeddings, when the shards carry them


def pixels_to_video(array: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W) in [0, 1]."""
    return torch.from_numpy(array).permute(3, 0, 1, 2).float() / 255.0


# (key, video or latents, caption, is_pixels, caption embeddings or None)
_Item = tuple[str, torch.Tensor, str, bool, torch.Tensor | None]


class AnchorLoader:
    def __init__(self, shards: list[str], batch_size: int, seed: int = 0, shuffle_buffer: int = 256,
                 encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 latent_shape: tuple[int, ...] | None = None,
                 buckets: list[tuple[int, ...]] | None = None, index: str | None = None):
        """latent_shape: the (C, T, H, W) stored latents must have (None: not checked); buckets:
        allowed stored shapes (None: any); index: an index.json whose per-sample entries each
        sample is checked against (default: one beside local shards, if there is one)."""
        if not shards:
            raise ValueError("AnchorLoader needs at least one shard")
        self.shards, self.batch_size, self.seed = list(shards), batch_size, seed
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.buckets = {tuple(int(s) for s in shape) for shape in buckets} if buckets else None
        index_url = index or fmt.index_url_beside(self.shards)
        self.sidecars, self.shard_position = None, {url: i for i, url in enumerate(self.shards)}
        if index_url:
            from ddrl_scale.data.sharded_split import _Sidecars

            self.sidecars = _Sidecars(fmt.shard_entries(self.shards, index_url))
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.encode = encode or (lambda videos: videos)
        self.epoch, self.position = 0, 0  # samples already given in the current epoch
        # bad samples met in earlier epochs, and in this epoch's pass so far: a restored loader
        # replays the epoch and meets the same bad samples again, so they are not counted twice
        self.skipped_before_epoch, self.skipped_this_epoch = 0, 0
        self._stream: Iterator[_Item] | None = None

    @property
    def skipped(self) -> int:
        """Unreadable samples skipped so far."""
        return self.skipped_before_epoch + self.skipped_this_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position,
                "skipped_before_epoch": self.skipped_before_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped_before_epoch, self.skipped_this_epoch = int(state["skipped_before_epoch"]), 0
        self._stream = None

    def _decode(self, url: str, raw: fmt.RawSample) -> _Item | None:
        """(key, video float (C, T, H, W), caption, is_pixels, caption embeddings or None): demo
        pixels (uint8 -> [0, 1]) or latents (and embeddings) that `ddrl data prepare` wrote
        (safetensors or npy), read without pickle; None for a bad sample (skipped and counted)."""
        from ddrl_scale.data.sharded_split import check_sample

        position = self.shard_position.get(url)
        decoded, error = check_sample(
            raw, lambda: None if self.sidecars is None else self.sidecars.get(position), self.buckets)
        if decoded is not None and not decoded.is_pixels and self.latent_shape is not None \
                and tuple(decoded.tensor.shape) != self.latent_shape:
            decoded, error = None, (f"latents of shape {list(decoded.tensor.shape)}, the run's is "
                                    f"{list(self.latent_shape)} (video.channels, num_frames, height, width)")
        if decoded is None:
            self.skipped_this_epoch += 1
            logger.warning("skipping sample '%s' of shard '%s': %s", raw.key, url, error)
            return None
        video = decoded.tensor.float() / 255.0 if decoded.is_pixels else decoded.tensor.float()
        text = None if decoded.text is None else decoded.text.float()
        return raw.key, video, decoded.caption, decoded.is_pixels, text

    def _epoch_samples(self, epoch: int) -> Iterator[_Item]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = self.shards[:]
        rng.shuffle(order)
        # a read error (truncated or corrupt tar) is one bad sample, then the shard's end
        raws = ((url, raw) for url in order for raw in fmt.iter_shard(url))
        buffer: list = []
        for url, raw in raws:
            decoded = self._decode(url, raw)
            if decoded is None:
                continue
            buffer.append(decoded)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def _samples(self) -> Iterator[_Item]:
        while True:
            given, self.skipped_this_epoch = 0, 0
            for item in self._epoch_samples(self.epoch):
                given += 1
                if given <= self.position:
                    continue  # replaying the epoch up to the restored position
                self.position = given
                yield item
            if given == 0:
                raise RuntimeError(f"no readable sample in the anchor shards {self.shards[:3]}...")
            self.epoch, self.position = self.epoch + 1, 0
            self.skipped_before_epoch += self.skipped_this_epoch
            self.skipped_this_epoch = 0

    def next_batch(self) -> AnchorBatch:
        if self._stream is None:
            self._stream = self._samples()
        items = [next(self._stream) for _ in range(self.batch_size)]
        pixels = [item[3] for item in items]
        if all(pixels):  # pixel videos go through the VAE; prepared latents are used as stored
            latents = self.encode(torch.stack([video for _, video, *_ in items]))
        else:
            latents = torch.stack([self.encode(video[None])[0] if is_pixels else video
                                   for _, video, _, is_pixels, _ in items])
        texts = [item[4] for item in items]
        # the shards' caption embeddings, when every sample of the batch has them
        text = torch.stack(texts) if all(t is not None for t in texts) else None
        return AnchorBatch(latents=latents, captions=[caption for _, _, caption, *_ in items],
                           keys=[key for key, *_ in items], text=text)
