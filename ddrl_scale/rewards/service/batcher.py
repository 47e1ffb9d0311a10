"""Server-side batching of the reward service.

Request threads queue their videos; one worker thread scores the queued requests together, up to
``max_batch`` videos of one frame size, waiting at most ``batch_window_ms`` for more, and splits the
scores back per request. This assumes, as every built-in reward does, that a video's score does not
depend on the other videos of its batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ddrl_scale.rewards.service.wire import wire_to_float

logger = logging.getLogger(__name__)


class _RewardInputError(Exception):
    """The reward refused a request's input (it raised ValueError or TypeError): HTTP 422."""


class _RewardFailure(Exception):
    """The reward failed on a request for another reason: HTTP 500."""


class _ShuttingDown(Exception):
    """The service no longer takes requests: HTTP 503."""


@dataclass(eq=False)  # identity comparison: jobs hold tensors
class ScoreJob:
    """One request waiting in the batcher: wire videos ``(B, 3, T, H, W)`` and ``B`` prompts."""

    videos: torch.Tensor
    prompts: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    scores: list[float] | None = None
    error: Exception | None = None

    def wait(self, timeout: float | None = None) -> list[float]:
        """Block until scored; the scores, or the error as ``_RewardInputError``/``_RewardFailure``."""
        if not self.done.wait(timeout):
            raise TimeoutError("the reward did not finish in time")
        if self.error is not None:
            raise self.error
        assert self.scores is not None
        return self.scores


def scoring_device(device: torch.device | str) -> torch.device:
    """`device` with its index: a bare "cuda" is the creating thread's current CUDA device (the
    rank's local device once set), not the scoring thread's, which starts at cuda:0."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class RewardBatcher:
    """Scores queued requests together in one worker thread.

    A batch starts with the oldest waiting request, takes the later ones with the same frame size
    ``(T, H, W)`` while they fit in ``max_batch`` videos, and waits at most ``window_s`` for more
    while it is not full. A request larger than ``max_batch`` is scored alone, in chunks. If a
    batch of several requests fails, each is scored alone so a bad request fails only itself.
    """

    def __init__(self, reward: Callable[..., torch.Tensor], device: torch.device | str = "cpu",
                 max_batch: int = 16, window_s: float = 0.01) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"batch window must be >= 0 seconds, got {window_s}")
        self.reward, self.device = reward, scoring_device(device)
        self.max_batch, self.window_s = max_batch, window_s
        self._queue: queue.Queue[ScoreJob | None] = queue.Queue()
        self._pending: list[ScoreJob] = []  # taken off the queue, not yet in a batch
        self._stopping = False
        self._closed = False
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "videos": 0, "batches": 0, "max_requests_per_batch": 0,
                      "max_videos_per_batch": 0, "failed_requests": 0}
        self._thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def enqueue(self, videos: torch.Tensor, prompts: list[str]) -> ScoreJob:
        """Queue wire videos and prompts; ``job.wait()`` gives the scores."""
        if self._closed:
            raise _ShuttingDown("the reward service is shutting down")
        job = ScoreJob(videos, prompts)
        self._queue.put(job)
        return job

    def stop(self, timeout: float | None = None) -> None:
        """Score what is queued, then end the worker thread."""
        self._closed = True
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.stats)

    def _run(self) -> None:
        # the current CUDA device is per thread and starts at cuda:0 in a new one: without this the
        # reward's own allocations (torch.device("cuda"), .cuda()) land on GPU 0 on every rank
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            batch = self._collect()
            if not batch:
                return
            self._score(batch)

    def _fits(self, first: ScoreJob, job: ScoreJob, size: int) -> bool:
        if size == 0:
            return True
        same_frames = job.videos.shape[2:] == first.videos.shape[2:]
        return same_frames and size + job.videos.shape[0] <= self.max_batch

    def _collect(self) -> list[ScoreJob]:
        """The next batch (oldest request first); empty once stopping with nothing left."""
        if not self._pending:
            if self._stopping:
                return []
            job = self._queue.get()
            if job is None:
                return []
            self._pending.append(job)
        first, batch, size = self._pending[0], [], 0
        for job in self._pending:
            if self._fits(first, job, size):
                batch.append(job)
                size += job.videos.shape[0]
        deadline = time.monotonic() + self.window_s
        while size < self.max_batch and not self._stopping:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if job is None:
                self._stopping = True
                break
            self._pending.append(job)
            if self._fits(first, job, size):
                batch.append(job)
                size += job.videos.shape[0]
        for job in batch:
            self._pending.remove(job)
        return batch

    def _score(self, batch: list[ScoreJob]) -> None:
        try:
            scores = self._call_reward(batch)
        except Exception as error:
            if len(batch) > 1:
                logger.warning("a batch of %d requests failed (%s); scoring them one by one",
                               len(batch), error)
                for job in batch:
                    self._score([job])
                return
            batch[0].error = self._classify(error)
            with self._lock:
                self.stats["failed_requests"] += 1
        else:
            start = 0
            for job in batch:
                job.scores = scores[start : start + job.videos.shape[0]]
                start += job.videos.shape[0]
        for job in batch:
            job.done.set()

    @staticmethod
    def _classify(error: Exception) -> Exception:
        message = f"{type(error).__name__}: {error}"
        if isinstance(error, (ValueError, TypeError)):
            return _RewardInputError(message)
        logger.error("reward failed: %s", message, exc_info=error)
        return _RewardFailure(message)

    def _call_reward(self, batch: list[ScoreJob]) -> list[float]:
        videos = torch.cat([wire_to_float(job.videos, self.device) for job in batch])
        prompts = [prompt for job in batch for prompt in job.prompts]
        scores = []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.max_batch):
                chunk = self.reward(videos[start : start + self.max_batch],
                                    prompts[start : start + self.max_batch])
                expected = (min(self.max_batch, len(prompts) - start),)
                if not isinstance(chunk, torch.Tensor) or tuple(chunk.shape) != expected:
                    got = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
                    raise RuntimeError(f"the reward returned {got}, expected a tensor of shape {expected}")
                scores.extend(chunk.float().cpu().tolist())
        with self._lock:
            self.stats["requests"] += len(batch)
            self.stats["videos"] += len(prompts)
            self.stats["batches"] += 1
            self.stats["max_requests_per_batch"] = max(self.stats["max_requests_per_batch"], len(batch))
            self.stats["max_videos_per_batch"] = max(self.stats["max_videos_per_batch"], len(prompts))
        return scores

