"""Anchor loader: shards -> batches of (latents, captions) for the data term and the prompts.

Reads the WebDataset shards of `data/shards.py` in a deterministic order per (seed, epoch) with a
seeded shuffle buffer, forever, epoch after epoch. Its position (epoch, samples taken in the epoch)
is saved in checkpoints; a restored loader replays the epoch's order and continues after the last
sample it gave. Unreadable samples are skipped, logged with shard and key, and counted.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds

from ddrl_scale.data.shards import decode_array

logger = logging.getLogger(__name__)


@dataclass
class AnchorBatch:
    latents: torch.Tensor  # (B, C, T, H, W)
    captions: list[str]
    keys: list[str]


def pixels_to_video(array: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W) in [0, 1]."""
    return torch.from_numpy(array).permute(3, 0, 1, 2).float() / 255.0


class AnchorLoader:
    def __init__(self, shards: list[str], batch_size: int, seed: int = 0, shuffle_buffer: int = 256,
                 encode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if not shards:
            raise ValueError("AnchorLoader needs at least one shard")
        self.shards, self.batch_size, self.seed = list(shards), batch_size, seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.encode = encode or (lambda videos: videos)
        self.epoch, self.position = 0, 0  # samples already given in the current epoch
        # bad samples met in earlier epochs, and in this epoch's pass so far: a restored loader
        # replays the epoch and meets the same bad samples again, so they are not counted twice
        self.skipped_before_epoch, self.skipped_this_epoch = 0, 0
        self._stream: Iterator[tuple[str, torch.Tensor, str]] | None = None

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

    def _decode(self, sample: dict) -> tuple[str, torch.Tensor, str] | None:
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        try:
            array = decode_array(sample["video.npy"])
            caption = sample["txt"].decode("utf-8")
            json.loads(sample.get("json", b"{}"))
            video = pixels_to_video(array) if array.dtype == np.uint8 else torch.from_numpy(
                array.astype(np.float32))
            if video.dim() != 4:
                raise ValueError(f"expected a 4-D video array, got shape {array.shape}")
        except Exception as error:  # any malformed sample is skipped, never fatal
            self.skipped_this_epoch += 1
            logger.warning("skipping sample '%s' of shard '%s': %s", key, url, error)
            return None
        return key, video, caption

    def _epoch_samples(self, epoch: int) -> Iterator[tuple[str, torch.Tensor, str]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = self.shards[:]
        rng.shuffle(order)
        dataset = wds.WebDataset(order, shardshuffle=False, empty_check=False,
                                 nodesplitter=None, workersplitter=None, handler=wds.warn_and_continue)
        buffer: list = []
        for sample in dataset:
            decoded = self._decode(sample)
            if decoded is None:
                continue
            buffer.append(decoded)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def _samples(self) -> Iterator[tuple[str, torch.Tensor, str]]:
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
        return AnchorBatch(
            latents=self.encode(torch.stack([video for _, video, _ in items])),
            captions=[caption for _, _, caption in items],
            keys=[key for key, _, _ in items],
        )
