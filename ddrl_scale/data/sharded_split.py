"""The split rule of the sharded anchor loader, and the stream of one reader it gives.

Place in the data flow: anchor shards -> here (which positions of an epoch each (rank, worker)
reader takes, read and decoded in the reader's shuffled order) -> `sharded_workers` (hands the items
to the main process) -> `sharded.ShardedAnchorLoader` (merges a rank's readers into batches). Kept
apart because what a reader yields, and in which order, depends only on (seed, epoch, shard counts,
readers) and the shards' contents: that is what lets a resumed loader give exactly the batches of an
uninterrupted one, and it runs the same in a worker process or inline. The rule is described in
`sharded`'s docstring.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ddrl_scale.data import latent_shards as fmt

# the loader's logger, so that all of its warnings come under one name
logger = logging.getLogger("ddrl_scale.data.sharded")


# -- the split ---------------------------------------------------------------------------------------
def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([key % (1 << 63) for key in keys])


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    return _rng(seed, epoch, 0x5EED).permutation(num_shards).tolist()


def reader_range(num_samples: int, num_readers: int, reader: int) -> tuple[int, int]:
    """Positions [start, stop) of the epoch's sample sequence that `reader` reads."""
    return reader * num_samples // num_readers, (reader + 1) * num_samples // num_readers


def reader_segments(counts: list[int], order: list[int], num_readers: int,
                    reader: int) -> list[tuple[int, int, int]]:
    """The reader's share as (shard, first sample, end sample) runs, in the epoch's shard order."""
    start, stop = reader_range(sum(counts), num_readers, reader)
    segments, offset = [], 0
    for shard in order:
        low, high = max(start, offset), min(stop, offset + counts[shard])
        if low < high:
            segments.append((shard, low - offset, high - offset))
        offset += counts[shard]
        if offset >= stop:
            break
    return segments


# -- the readers (in DataLoader workers, or inline) --------------------------------------------------
@dataclass
class _Item:
    """One position of a reader's stream: a decoded sample, or `error` for a bad one."""

    epoch: int
    worker: int
    position: int  # index in the reader's emitted order within the epoch
    shard: str
    index: int  # sample index inside the shard
    key: str
    tensor: torch.Tensor | None
    is_pixels: bool
    caption: str
    text: torch.Tensor | None
    num_bytes: int
    error: str | None = None


@dataclass
class _StreamSpec:
    entries: list[fmt.ShardEntry]
    seed: int
    rank: int
    world_size: int
    readers_per_rank: int
    window: int
    buckets: set[tuple[int, ...]] | None

    @property
    def num_readers(self) -> int:
        return self.world_size * self.readers_per_rank

    @property
    def counts(self) -> list[int]:
        return [entry.num_samples for entry in self.entries]


class _Sidecars:
    """Per-sample index entries of the shards a reader opens (the last few kept)."""

    def __init__(self, entries: list[fmt.ShardEntry], keep: int = 4):
        self.entries, self.keep, self.cache = entries, keep, {}

    def get(self, shard: int) -> list[dict] | None:
        if shard not in self.cache:
            url = self.entries[shard].sidecar_url
            try:
                self.cache[shard] = fmt.load_sidecar(url)["samples"] if url else None
            except (OSError, fmt.ShardFormatError) as error:
                logger.warning("sidecar of shard '%s' unreadable (%s): its samples are not checked "
                               "against the index", self.entries[shard].url, error)
                self.cache[shard] = None
            while len(self.cache) > self.keep:
                self.cache.pop(next(iter(self.cache)))
        return self.cache[shard]


def _raw_positions(spec: _StreamSpec, segments: list[tuple[int, int, int]], skip: int,
                   sidecars: _Sidecars) -> Iterator[tuple[int, int, fmt.RawSample]]:
    """(shard, sample index, raw sample) for every position of the segments after the first `skip`;
    positions a broken shard cannot deliver come as RawSamples with `error` set."""
    for shard, first, end in segments:
        if skip >= end - first:
            skip -= end - first
            continue
        start, skip, expected = first + skip, 0, first + skip
        url = spec.entries[shard].url
        for raw in fmt.iter_shard(url, start, end):
            if raw.error is not None:
                if raw.key == "?":
                    raw.key = _listed_key(sidecars.get(shard), expected)
                yield shard, expected, raw
                expected += 1
                break
            yield shard, raw.index, raw
            expected = raw.index + 1
        for missing in range(expected, end):
            yield shard, missing, fmt.RawSample(missing, _listed_key(sidecars.get(shard), missing), {}, 0,
                                                f"missing: the shard ended before sample {missing}")


def _listed_key(listed: list[dict] | None, index: int) -> str:
    """The key the index gives position `index` of a shard, for naming samples a shard lost."""
    return listed[index]["key"] if listed is not None and index < len(listed) else f"#{index}"


def _decode(spec: _StreamSpec, shard: int, raw: fmt.RawSample, sidecars: _Sidecars) -> tuple:
    """(sample or None, error or None) with the index and bucket checks."""
    return check_sample(raw, lambda: sidecars.get(shard), spec.buckets)


def check_sample(raw: fmt.RawSample, listed: Callable[[], list[dict] | None],
                 buckets: set[tuple[int, ...]] | None) -> tuple[fmt.Sample | None, str | None]:
    """(sample, None) for a good sample, (None, reason) for a bad one: a read error, an undecodable
    or non-finite tensor, no caption (`decode_sample`), a shape that differs from the shard's index
    entry (`listed()`: the sidecar's samples, None without an index) or is not in `buckets`. Both
    anchor loaders check every sample with it."""
    if raw.error is not None:
        return None, raw.error
    try:
        sample = fmt.decode_sample(raw.key, raw.members)
    except fmt.ShardFormatError as error:
        return None, str(error)
    shape = tuple(sample.tensor.shape)
    listed = listed()
    if listed is not None:
        if raw.index >= len(listed) or listed[raw.index]["key"] != raw.key:
            return None, "sample does not match the index (key or position differs)"
        expected = listed[raw.index]
        if list(shape) != list(expected["shape"]):
            return None, f"shape {list(shape)} differs from the index's {expected['shape']}"
    if buckets is not None and shape not in buckets:
        return None, f"shape {list(shape)} is not one of the configured buckets {sorted(buckets)}"
    return sample, None


def reader_items(spec: _StreamSpec, worker: int, epoch: int, position: int) -> Iterator[_Item]:
    """The endless stream of reader (rank, worker) from `position` of `epoch` on."""
    reader = spec.rank * spec.readers_per_rank + worker
    sidecars = _Sidecars(spec.entries)
    while True:
        order = epoch_shard_order(len(spec.entries), spec.seed, epoch)
        segments = reader_segments(spec.counts, order, spec.num_readers, reader)
        length = sum(end - first for _, first, end in segments)
        first_window = position // spec.window
        raws = _raw_positions(spec, segments, first_window * spec.window, sidecars)
        for window in range(first_window, -(-length // spec.window)):
            size = min(spec.window, length - window * spec.window)
            held = [next(raws) for _ in range(size)]
            permutation = _rng(spec.seed, epoch, spec.num_readers, reader, window).permutation(size)
            begin = position - window * spec.window if window == first_window else 0
            for rank_in_window in range(begin, size):
                shard, index, raw = held[permutation[rank_in_window]]
                sample, error = _decode(spec, shard, raw, sidecars)
                yield _Item(epoch, worker, window * spec.window + rank_in_window, spec.entries[shard].url,
                            index, raw.key, None if sample is None else sample.tensor,
                            bool(sample and sample.is_pixels), sample.caption if sample else "",
                            None if sample is None else sample.text, raw.num_bytes, error)
                held[permutation[rank_in_window]] = None  # emitted: free its bytes
        epoch, position = epoch + 1, 0
