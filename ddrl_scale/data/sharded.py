"""Sharded anchor loader: each data-parallel rank reads only its share of the anchor shards.

Place in the data flow (docs/architecture.md): anchor shards -> this loader -> the data term (and
the prompts) of every DDRL iteration, as `anchor.AnchorLoader` does when every rank reads the whole
global batch (`split: replicated`). Same interface: `next_batch()` gives this rank's `batch_size`
samples, `state_dict()` / `load_state_dict()`, `skipped`, plus `metrics()`.

The split rule (one epoch = every sample of the shards once, across the whole world):
  1. Epoch `e` orders the shards by a permutation seeded by (seed, e) and concatenates their
     samples into one sequence of N positions (sample counts come from the index, or from the tar
     headers of local shards).
  2. There are R = world_size x W readers, W = max(1, num_workers) per rank; reader
     r = rank x W + worker takes the contiguous positions [r N / R, (r + 1) N / R) (integer
     division). So readers differ by at most one sample, whatever N and the shard sizes, and a reader
     opens at most two shards it shares with another reader (it skips to its first sample by
     seeking in a local tar).
  3. A reader shuffles within windows of `shuffle_window` consecutive positions (permutation seeded
     by (seed, e, R, r, window)), decoding only what it emits.
  4. The rank merges its W readers round-robin, one sample each in worker order, a reader leaving
     the rotation when its share of the epoch is done; the next epoch follows. Samples are grouped in
     buckets by (pixels or latents, shape): a batch is the first bucket to reach `batch_size`
     samples; partial buckets carry over into the next epoch.
So the rank's sequence is a pure function of (seed, epoch, shard counts, R), and the state
(epoch, samples taken from each reader, the samples waiting in partial buckets) resumes it exactly:
a restored loader gives exactly the batches an uninterrupted one would (same seed, world size and
num_workers; with another topology it starts the next epoch afresh, with a warning).

Ranks' epochs are independent (their shares differ by at most W samples, so an epoch ends on a
rank a few samples before or after another). Each rank's state is its own: `gather_state`
collects them all for a checkpoint and `load_state_dict` picks this rank's.

Prefetching: each worker decodes `prefetch` samples ahead and hands them over in chunks of
`worker_chunk` consecutive samples packed into a shared-memory buffer reused from a small ring (a new
segment per transfer costs page faults on both sides); a thread assembles `batch_prefetch` batches
ahead, each with the state right after it, so `state_dict()` is always the position of the last
batch handed out. Neither changes the order above. Batches
are float32 by default (as the replicated loader's); `latents_dtype=None` keeps the stored fp16/bf16,
half the bytes to convert here and to copy to the accelerator.

Bad samples (truncated tar members, missing members, undecodable tensors, a shape or dtype that
differs from the index's sidecar or from `buckets`, NaN/inf latents) are skipped, logged with
shard and key, counted in `metrics()`; they keep their position, so resume stays exact. No shard
content is unpickled (npy with allow_pickle=False, safetensors, JSON); the worker processes hand
decoded tensors to the main process through torch's shared-memory queues.

Shard URLs: local paths or anything webdataset's `gopen` opens (`pipe:` commands, so also
`pipe:aws s3 cp s3://... -`, and http(s) through curl); remote shards need an index URL.

Where it lives: the split rule (steps 1-3) and the reading, decoding and checking of each sample in
`sharded_split.py`; the worker processes, their shared-memory transfer and the batch prefetch thread
in `sharded_workers.py`; the merge (step 4), the buckets, the state and the batches here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ddrl_scale.data import latent_shards as fmt
from ddrl_scale.data.anchor import AnchorBatch, AnchorLoader
from ddrl_scale.data.sharded_split import _decode, _Item, _Sidecars, _StreamSpec, reader_range
from ddrl_scale.data.sharded_workers import _BatchPrefetcher, _InlineSource, _WorkerSource

logger = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_EMPTY_EPOCHS = 16  # this many epochs in a row without a readable sample -> the data is broken
MAX_LISTED_BAD = 10_000


@dataclass
class ShardedBatch(AnchorBatch):
    """An AnchorBatch with where each sample came from; `text` holds precomputed caption
    embeddings (B, L, D) when the shards carry them."""

    epochs: list[int] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    text: torch.Tensor | None = None


def _base_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# -- the loader ----------------------------------------------------------------------------------------
class ShardedAnchorLoader:
    """This rank's share of the anchor shards as batches (see the module docstring for the rule).

    Args:
        shards: shard URLs (local paths, `pipe:...`, http(s)); the order does not matter beyond
            naming: the epoch order is a seeded permutation.
        batch_size: samples per batch on this rank.
        rank, world_size: this rank among the data-parallel ranks (ranks of one model-parallel
            group must pass the same data-parallel rank: they train on the same samples).
        num_workers: DataLoader worker processes of this rank (0 = read in this process).
        prefetch: samples each worker decodes ahead (rounded up to whole chunks).
        worker_chunk: consecutive samples a worker hands over at once (one shared-memory transfer).
        shuffle_window: positions shuffled together inside a reader (memory: this many raw samples
            per worker).
        buckets: allowed stored shapes (C, T, H, W); None accepts every shape (a bucket per shape).
        encode: applied to pixel batches (demo shards: uint8 -> [0, 1] -> encode); stored latents
            are returned as they are, in float32.
        index: the index.json URL (default: `index.json` beside local shards, if there is one;
            without an index the sample counts come from the local tar headers).
        batch_prefetch: batches a background thread assembles ahead (merging, decoding checks,
            conversion), so that next_batch rarely waits; 0 assembles each batch in next_batch.
        latents_dtype: dtype of the batch's stored latents (default float32, as the replicated
            loader); None keeps the stored fp16/bf16 (half the bytes to copy and to move to the GPU).
    """

    def __init__(self, shards: list[str], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, prefetch: int = 16, shuffle_window: int = 64,
                 buckets: list[tuple[int, ...]] | None = None,
                 encode: Callable[[torch.Tensor], torch.Tensor] | None = None, index: str | None = None,
                 worker_chunk: int = 8, latents_dtype: torch.dtype | None = torch.float32,
                 batch_prefetch: int = 2):
        if not shards:
            raise ValueError("ShardedAnchorLoader needs at least one shard")
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("num_workers", num_workers, 0), ("prefetch", prefetch, 1),
                                 ("shuffle_window", shuffle_window, 1), ("worker_chunk", worker_chunk, 1),
                                 ("batch_prefetch", batch_prefetch, 0)):
            if value < low:
                raise ValueError(f"ShardedAnchorLoader: {name} must be >= {low}, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedAnchorLoader: rank {rank} is not in [0, {world_size})")
        entries = fmt.shard_entries(list(shards), index or fmt.index_url_beside(list(shards)))
        # a canonical order: the epoch permutation must not depend on how the list was spelled
        entries.sort(key=lambda entry: (_base_name(entry.url), entry.url))
        self.spec = _StreamSpec(entries, seed, rank, world_size, max(1, num_workers), shuffle_window,
                                {tuple(int(s) for s in shape) for shape in buckets} if buckets else None)
        self.num_samples = sum(self.spec.counts)
        if self.num_samples < self.spec.num_readers:
            raise ValueError(f"the anchor shards hold {self.num_samples} samples, fewer than the "
                             f"{self.spec.num_readers} readers (world_size {world_size} x "
                             f"{self.spec.readers_per_rank} workers): use fewer workers")
        self.batch_size, self.seed, self.num_workers, self.prefetch = batch_size, seed, num_workers, prefetch
        self.worker_chunk, self.latents_dtype = worker_chunk, latents_dtype
        self.encode = encode or (lambda videos: videos)
        self.epoch = 0
        self.positions = [0] * self.spec.readers_per_rank
        self.buckets: dict[tuple, list[_Item]] = {}
        self.counters = {"samples": 0, "skipped": 0, "bytes_read": 0, "batches": 0}
        self.wait_s = 0.0
        self.bad_samples: list[tuple[str, str, str]] = []  # (shard, key, reason), the first ones
        self._good_this_epoch, self._empty_epochs = 0, 0
        self._source: _InlineSource | _WorkerSource | None = None
        self.batch_prefetch = batch_prefetch
        self._prefetcher: _BatchPrefetcher | None = None
        self._consumed_state: dict | None = None  # the state after the last batch handed out

    # -- public interface --------------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        """Bad samples skipped by this rank up to the last batch handed out."""
        return int(self.state_dict()["skipped"])

    def epoch_size(self, epoch: int | None = None) -> int:
        """Positions (good and bad samples) this rank reads in an epoch."""
        del epoch  # the same every epoch: the contiguous split depends on N and R only
        return sum(self._reader_lengths())

    def metrics(self) -> dict[str, float]:
        """Counters of this rank up to the last batch handed out: samples, skipped, bytes_read,
        batches, epoch, pending (samples waiting in partial buckets); and wait_s, the time spent in
        next_batch (the trainer waiting for data)."""
        state = self.state_dict()
        return {**{name: state[name] for name in self.counters}, "wait_s": self.wait_s,
                "epoch": state["epoch"], "pending": sum(len(items) for items in state["pending"])}

    def next_batch(self) -> ShardedBatch:
        start = time.perf_counter()
        if self.batch_prefetch == 0:
            batch = self._make_batch()
        else:
            if self._prefetcher is None:
                self._prefetcher = _BatchPrefetcher(self._make_batch_and_state, self.batch_prefetch)
            batch, self._consumed_state = self._prefetcher.get()
        self.wait_s += time.perf_counter() - start
        return batch

    def _make_batch_and_state(self) -> tuple[ShardedBatch, dict]:
        batch = self._make_batch()
        return batch, self._live_state()

    def _make_batch(self) -> ShardedBatch:
        if self._source is None:
            self._source = self._open_source()
        while True:
            item = self._next_item()
            if item.error is not None:
                self._count_bad(item.shard, item.key, item.error)
                continue
            self._good_this_epoch += 1
            key = (item.is_pixels, tuple(item.tensor.shape))
            bucket = self.buckets.setdefault(key, [])
            bucket.append(item)
            if len(bucket) == self.batch_size:
                del self.buckets[key]
                break
        return self._collate(bucket)

    def state_dict(self) -> dict:
        """This rank's position after the last batch handed out (batches prefetched beyond it are
        not in it): plain ints, strings and lists, safe for torch.load(weights_only=True)."""
        if self._prefetcher is not None and self._consumed_state is not None:
            return self._consumed_state
        return self._live_state()

    def _live_state(self) -> dict:
        return {"version": STATE_VERSION, "rank": self.spec.rank, "world_size": self.spec.world_size,
                "readers_per_rank": self.spec.readers_per_rank, "seed": self.seed,
                "dataset": self._dataset_fingerprint(), "epoch": self.epoch,
                "positions": list(self.positions),
                "pending": [[[item.shard, item.index, item.epoch, item.key] for item in items]
                            for items in self.buckets.values()],
                **{name: int(value) for name, value in self.counters.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's position from its own state or from a `gather_state` dict."""
        if "ranks" in state:
            ranks = state["ranks"]
            own = ranks.get(str(self.spec.rank))
            if own is None or len(ranks) != self.spec.world_size:
                self._restart_after_topology_change(ranks, f"{len(ranks)} data-parallel ranks saved, "
                                                           f"{self.spec.world_size} now")
                return
            state = own
        if int(state.get("version", -1)) != STATE_VERSION:
            raise ValueError(f"sharded loader state version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        mismatch = [name for name, now in (("rank", self.spec.rank), ("world_size", self.spec.world_size),
                                           ("readers_per_rank", self.spec.readers_per_rank),
                                           ("seed", self.seed), ("dataset", self._dataset_fingerprint()))
                    if state.get(name) != now]
        if mismatch:
            self._restart_after_topology_change({"0": state}, f"{mismatch} differ from the checkpoint")
            return
        self.close()
        self._restore(state)

    def _restore(self, state: dict) -> None:
        self.epoch, self.positions = int(state["epoch"]), [int(p) for p in state["positions"]]
        self.counters = {name: int(state[name]) for name in self.counters}
        self.buckets, self._good_this_epoch, self._empty_epochs = {}, 1, 0
        for saved in state["pending"]:
            for shard, index, epoch, key in saved:
                self._refetch(shard, int(index), int(epoch), key)

    def close(self) -> None:
        """Stop the batch prefetch thread and the worker processes (a later next_batch starts them
        again, from the position of the last batch handed out)."""
        if self._prefetcher is not None:
            state = self.state_dict()
            self._prefetcher.stop()
            self._prefetcher = None
            self._source_close()
            self._restore(state)  # undo what the thread prepared beyond the last batch handed out
            self._consumed_state = None
            return
        self._source_close()

    def _source_close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None

    def __del__(self) -> None:
        try:  # no state to keep: stop the thread and the workers, nothing more
            if self._prefetcher is not None:
                self._prefetcher.stop(timeout_s=1.0)
            self._source_close()
        except Exception:  # interpreter shutdown: nothing left to clean
            pass

    # -- internals ---------------------------------------------------------------------------------
    def _reader_lengths(self) -> list[int]:
        first = self.spec.rank * self.spec.readers_per_rank
        ranges = [reader_range(self.num_samples, self.spec.num_readers, first + worker)
                  for worker in range(self.spec.readers_per_rank)]
        return [stop - start for start, stop in ranges]

    def _dataset_fingerprint(self) -> str:
        import hashlib

        names = [[_base_name(entry.url), entry.num_samples] for entry in self.spec.entries]
        return hashlib.sha256(repr(names).encode()).hexdigest()[:16]

    def _open_source(self) -> _InlineSource | _WorkerSource:
        if self.num_workers == 0:
            return _InlineSource(self.spec, self.epoch, self.positions)
        return _WorkerSource(self.spec, self.epoch, self.positions, self.prefetch, self.worker_chunk)

    def _next_item(self) -> _Item:
        lengths = self._reader_lengths()
        while True:
            open_readers = [w for w in range(len(lengths)) if self.positions[w] < lengths[w]]
            if open_readers:
                break
            self._end_epoch()
        worker = min(open_readers, key=lambda w: (self.positions[w], w))
        item = self._source.get(worker)
        if (item.epoch, item.position) != (self.epoch, self.positions[worker]):
            raise RuntimeError(f"sharded loader out of step: worker {worker} gave epoch {item.epoch} "
                               f"position {item.position}, expected {self.epoch}/{self.positions[worker]}")
        self.positions[worker] += 1
        self.counters["bytes_read"] += item.num_bytes
        return item

    def _end_epoch(self) -> None:
        self._empty_epochs = 0 if self._good_this_epoch else self._empty_epochs + 1
        if self._empty_epochs >= MAX_EMPTY_EPOCHS:
            shards = [entry.url for entry in self.spec.entries[:3]]
            raise RuntimeError(f"rank {self.spec.rank}: no readable anchor sample in {MAX_EMPTY_EPOCHS} "
                               f"epochs of its share of the shards {shards}...; see the warnings above")
        self.epoch, self.positions, self._good_this_epoch = self.epoch + 1, [0] * len(self.positions), 0

    def _count_bad(self, shard: str, key: str, reason: str) -> None:
        self.counters["skipped"] += 1
        if len(self.bad_samples) < MAX_LISTED_BAD:
            self.bad_samples.append((shard, key, reason))
        logger.warning("skipping sample '%s' of shard '%s': %s", key, shard, reason)

    def _collate(self, items: list[_Item]) -> ShardedBatch:
        dtype = torch.float32 if items[0].is_pixels else (self.latents_dtype or items[0].tensor.dtype)
        # in this process's memory, copy_ converts fp16/bf16/uint8 to the batch's dtype in one pass;
        # from the workers' shared memory, converting while copying is ~6x slower on CPU than a plain
        # copy (measured), so those are gathered in the stored dtype first and converted after
        stored = items[0].tensor.dtype if self.num_workers else dtype
        latents = torch.empty((len(items), *items[0].tensor.shape), dtype=stored)
        for row, item in enumerate(items):
            latents[row].copy_(item.tensor)
        latents = latents.to(dtype)
        if items[0].is_pixels:
            latents = self.encode(latents.div_(255.0))
        texts = [item.text for item in items]
        text = None
        if all(t is not None for t in texts) and len({tuple(t.shape) for t in texts}) == 1:
            text = torch.stack(texts).float()
        self.counters["samples"] += len(items)
        self.counters["batches"] += 1
        return ShardedBatch(latents=latents, captions=[item.caption for item in items],
                            keys=[item.key for item in items], epochs=[item.epoch for item in items],
                            shards=[item.shard for item in items], text=text)

    def _refetch(self, shard_url: str, index: int, epoch: int, key: str) -> None:
        """Read one sample that waited in a partial bucket when the state was saved."""
        shard = next((i for i, entry in enumerate(self.spec.entries) if entry.url == shard_url), None)
        if shard is None:  # the shards may have moved: match by file name
            shard = next((i for i, entry in enumerate(self.spec.entries)
                          if _base_name(entry.url) == _base_name(shard_url)), None)
        if shard is None:
            self._count_bad(shard_url, key, "waiting sample's shard is no longer in the shard list")
            return
        shard_url = self.spec.entries[shard].url
        raw = next(iter(fmt.iter_shard(shard_url, index, index + 1)), None)
        if raw is None:
            raw = fmt.RawSample(index, key, {}, 0, f"missing: the shard ended before sample {index}")
        sample, error = _decode(self.spec, shard, raw, _Sidecars(self.spec.entries))
        if error is None and raw.key != key:
            error = f"sample {index} of the shard is now '{raw.key}', the checkpoint expected '{key}'"
        if error is not None:
            self._count_bad(shard_url, key, error)
            return
        item = _Item(epoch, -1, -1, shard_url, index, key, sample.tensor, sample.is_pixels, sample.caption,
                     sample.text, 0)
        self.buckets.setdefault((item.is_pixels, tuple(item.tensor.shape)), []).append(item)

    def _restart_after_topology_change(self, ranks: dict, why: str) -> None:
        epoch = max(int(state.get("epoch", 0)) for state in ranks.values()) + 1
        logger.warning("sharded loader: cannot resume mid-epoch exactly (%s): starting epoch %d afresh",
                       why, epoch)
        self.close()
        self.epoch, self.positions, self.buckets = epoch, [0] * self.spec.readers_per_rank, {}
        self._good_this_epoch, self._empty_epochs = 1, 0
        own = ranks.get(str(self.spec.rank), {})
        self.counters = {name: int(own.get(name, 0)) for name in self.counters}


def gather_state(loader: ShardedAnchorLoader, own: dict | None = None) -> dict:
    """Every data-parallel rank's state, for a checkpoint written by one rank: {"ranks": {"0": ...}}.

    Collective when torch.distributed is initialised (all ranks must call it); ranks of one
    model-parallel group hold the same state, and one copy per data-parallel rank is kept.
    `own`: this rank's state to contribute (default: the loader's current one)."""
    import torch.distributed as dist

    own = loader.state_dict() if own is None else own
    if dist.is_available() and dist.is_initialized():
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, own)
    else:
        states = [own]
    return {"ranks": {str(state["rank"]): state for state in states}}


def build_loader(shards: str | list[str], global_batch_size: int, *, split: str = "replicated",
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 prefetch: int = 16, shuffle_buffer: int = 256, buckets: list[list[int]] | None = None,
                 index: str = "", encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 latents_dtype: torch.dtype | None = torch.float32,
                 latent_shape: tuple[int, ...] | None = None) -> AnchorLoader | ShardedAnchorLoader:
    """The anchor loader a DataSection asks for.

    split="replicated": `AnchorLoader` (every rank reads the global batch; the trainer keeps its
    slice). split="sharded": `ShardedAnchorLoader` of this data-parallel rank, whose batches are
    already the local share (global_batch_size / world_size samples); `shuffle_buffer` becomes its
    shuffle window. `shards` is a spec string (folder, glob, brace pattern, URLs) or a URL list.
    Both check every sample against `index` and `buckets`; the replicated loader also checks stored
    latents against `latent_shape` (its batch is one tensor).
    """
    from ddrl_scale.data.shards import resolve_shards

    urls = resolve_shards(shards) if isinstance(shards, str) else list(shards)
    if split == "replicated":
        return AnchorLoader(urls, global_batch_size, seed, shuffle_buffer, encode, latent_shape,
                            [tuple(shape) for shape in buckets] if buckets else None, index or None)
    if split != "sharded":
        raise ValueError(f"data.split: expected replicated|sharded, got {split!r}")
    if global_batch_size % world_size:
        raise ValueError(f"the global anchor batch {global_batch_size} must be a multiple of the "
                         f"{world_size} data-parallel ranks")
    shapes = [tuple(shape) for shape in buckets] if buckets else None
    return ShardedAnchorLoader(urls, global_batch_size // world_size, seed, rank, world_size, num_workers,
                               prefetch, shuffle_buffer, shapes, encode, index or None,
                               latents_dtype=latents_dtype)
