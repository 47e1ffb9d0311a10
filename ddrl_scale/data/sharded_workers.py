"""How the sharded anchor loader's readers reach it: worker processes, shared memory, prefetching.

Place in the data flow: `sharded_split.reader_items` (one reader's decoded items) -> here -> the
items `sharded.ShardedAnchorLoader` merges into batches. Each DataLoader worker runs one reader and
hands chunks of consecutive items over packed in one reused shared-memory slot (or the single reader
runs inline when num_workers=0); a thread in the main process assembles batches ahead. Kept apart
because none of it changes which samples come in which order, only how fast they arrive.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ddrl_scale.data.sharded_split import _Item, _StreamSpec, reader_items


def pack_items(items: list[_Item],
               into: torch.Tensor | None = None) -> tuple[list[_Item], torch.Tensor, list]:
    """Move the items' tensors into one uint8 buffer (`into` when they fit, else a new one), so that a
    chunk crosses to the main process as one buffer instead of one shared-memory segment per sample."""
    layout, offset = [], 0
    for item in items:
        if item.tensor is None:
            layout.append(None)
            continue
        size = item.tensor.numel() * item.tensor.element_size()
        layout.append((offset, size, item.tensor.dtype, tuple(item.tensor.shape)))
        offset += -(-size // 8) * 8  # keep every tensor 8-byte aligned for its dtype view
    buffer = into if into is not None and offset <= into.numel() else torch.empty(offset, dtype=torch.uint8)
    for item, place in zip(items, layout):
        if place is not None:
            buffer[place[0]:place[0] + place[1]].copy_(item.tensor.contiguous().view(-1).view(torch.uint8))
            item.tensor = None
    return items, buffer, layout


def unpack_items(items: list[_Item], buffer: torch.Tensor, layout: list, copy: bool = False) -> list[_Item]:
    """The inverse of pack_items: tensors become views of `buffer`, or copies with `copy`."""
    for item, place in zip(items, layout):
        if place is not None:
            offset, size, dtype, shape = place
            view = buffer[offset:offset + size].view(dtype).view(shape)
            item.tensor = view.clone() if copy else view
    return items


class _SlotRing:
    """Shared-memory buffers made before the workers start and reused for every chunk.

    A new shared-memory segment per chunk costs a page fault per 4 KiB page in the worker and again
    in the main process (measured here: ~15-40 ms per 8 MiB chunk); a reused slot costs one copy in
    each (~1.4 ms). Each worker has its own slots and a queue of the free ones; the main process
    copies a chunk out and frees its slot at once, so a worker finds one free unless the queue's
    feeder thread lags, in which case it falls back to a new buffer (correct, only slower)."""

    def __init__(self, num_workers: int, slots: int, slot_bytes: int):
        context = multiprocessing.get_context()
        self.buffers = [[torch.empty(slot_bytes, dtype=torch.uint8).share_memory_() for _ in range(slots)]
                        for _ in range(num_workers)]
        self.free = [context.Queue() for _ in range(num_workers)]
        for queue in self.free:
            for slot in range(slots):
                queue.put(slot)

    def take(self, worker: int) -> int | None:
        try:
            return self.free[worker].get(timeout=0.05)
        except queue_module.Empty:
            return None

    def close(self) -> None:
        for queue in self.free:
            queue.cancel_join_thread()  # nothing left to deliver: exit without waiting on the feeder
            queue.close()


class _ReaderDataset(IterableDataset):
    """What each DataLoader worker runs: its reader's stream from the loader's restored position, in
    packed chunks of `chunk` consecutive items, written into a free ring slot when there is one."""

    def __init__(self, spec: _StreamSpec, epoch: int, positions: list[int], chunk: int,
                 ring: _SlotRing | None):
        super().__init__()
        self.spec, self.epoch, self.positions, self.chunk, self.ring = spec, epoch, positions, chunk, ring

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = reader_items(self.spec, worker, self.epoch, self.positions[worker])
        while True:
            items = [next(stream) for _ in range(self.chunk)]
            slot = self.ring.take(worker) if self.ring is not None else None
            target = self.ring.buffers[worker][slot] if slot is not None else None
            items, buffer, layout = pack_items(items, target)
            if slot is not None and buffer is target:
                yield items, slot, layout  # only the slot number travels; the bytes are in place
                continue
            if slot is not None:
                self.ring.free[worker].put(slot)  # the chunk did not fit
            yield items, buffer, layout


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is light; the workers must not compete with the trainer


class _InlineSource:
    """num_workers=0: the single reader runs in the calling process."""

    def __init__(self, spec: _StreamSpec, epoch: int, positions: list[int]):
        self.stream = reader_items(spec, 0, epoch, positions[0])

    def get(self, worker: int) -> _Item:
        return next(self.stream)

    def close(self) -> None:
        self.stream.close()


class _WorkerSource:
    """num_workers>0: W DataLoader workers with prefetching; items sorted into per-worker queues so
    that the merge order never depends on which worker answered first."""

    def __init__(self, spec: _StreamSpec, epoch: int, positions: list[int], prefetch: int, chunk: int):
        chunks_ahead = max(1, -(-prefetch // chunk))  # prefetch counts samples; the DataLoader, chunks
        largest = [entry.max_tensor_bytes for entry in spec.entries]
        self.ring = None
        if all(size is not None for size in largest):  # slot size known from the index or the headers
            slot_bytes = chunk * (-(-max(largest) // 8) * 8)
            self.ring = _SlotRing(spec.readers_per_rank, chunks_ahead + 2, slot_bytes)
        loader = DataLoader(_ReaderDataset(spec, epoch, positions, chunk, self.ring), batch_size=None,
                            num_workers=spec.readers_per_rank, prefetch_factor=chunks_ahead,
                            worker_init_fn=_worker_init)
        self.iterator = iter(loader)
        self.queues: list[deque[_Item]] = [deque() for _ in range(spec.readers_per_rank)]

    def get(self, worker: int) -> _Item:
        while not self.queues[worker]:
            items, payload, layout = next(self.iterator)
            sender = items[0].worker
            if isinstance(payload, int):  # a ring slot: copy the chunk out, then hand the slot back
                unpack_items(items, self.ring.buffers[sender][payload], layout, copy=True)
                self.ring.free[sender].put(payload)
            else:
                unpack_items(items, payload, layout)
            self.queues[sender].extend(items)
        return self.queues[worker].popleft()

    def close(self) -> None:
        shutdown = getattr(self.iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # stop the workers now rather than whenever the iterator is collected
        self.iterator = None
        if self.ring is not None:
            self.ring.close()


class _BatchPrefetcher:
    """A thread that assembles the next batches ahead, each with the loader state right after it, so
    that a checkpoint holds the position of the last batch handed out, not of the last one made."""

    def __init__(self, make: Callable[[], tuple], depth: int):
        self.queue: queue_module.Queue = queue_module.Queue(maxsize=depth)
        self.stopping = threading.Event()
        # a weak reference: a loader dropped without close() is still collected, which stops us
        self.thread = threading.Thread(target=self._run, args=(weakref.WeakMethod(make),),
                                       name="anchor-prefetch", daemon=True)
        self.thread.start()

    def _run(self, make_ref: weakref.WeakMethod) -> None:
        while not self.stopping.is_set():
            make = make_ref()
            if make is None:
                return
            try:
                result: object = make()
            except BaseException as error:  # handed to next_batch, which raises it in the trainer
                result = error
            del make
            while not self.stopping.is_set():
                try:
                    self.queue.put(result, timeout=0.1)
                    break
                except queue_module.Full:
                    continue
            if isinstance(result, BaseException):
                return

    def get(self) -> tuple:
        result = self.queue.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; one stuck reading (a stalled remote shard) is left to end when the
        caller closes the workers under it."""
        self.stopping.set()
        if threading.current_thread() is self.thread:
            return  # the loader was collected from inside the thread: it ends on its own
        deadline = time.monotonic() + timeout_s
        while self.thread.is_alive() and time.monotonic() < deadline:
            try:
                self.queue.get(timeout=0.1)  # unblock a pending put
            except queue_module.Empty:
                pass
            self.thread.join(timeout=0.1)
