"""Peak CPU tensor memory of a piece of code, measured from the allocator's own events.

Used to check `telemetry.plan`'s memory model against real CPU training steps (tests/test_plan.py)
and by benchmarks that report memory on machines without a GPU. On CUDA,
`torch.cuda.max_memory_allocated` answers the same question; the CPU has no such counter, so this
runs the code under the torch profiler with `profile_memory=True`, which records every allocation
and free of the CPU allocator (tensors and the kernels' scratch buffers alike), and replays them.
`cuda_peak_memory` reads the CUDA counters for the trainer's metrics and the run summary.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


@dataclass(frozen=True)
class PeakMemory:
    """Bytes of CPU tensor memory: live before the code ran, and at its highest while it ran."""

    baseline_bytes: int  # storages of every CPU tensor alive at the start (parameters, optimizer state...)
    peak_increase_bytes: int  # highest live total during the code, minus the baseline
    end_increase_bytes: int  # live total after the code, minus the baseline (what it kept)
    # frees the profiler missed: what the allocator events say is still live at the end but no
    # tensor holds (see measure_cpu_peak_memory); the true peak is at most this much lower
    unseen_free_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.baseline_bytes + self.peak_increase_bytes

    @property
    def peak_bytes_lower_bound(self) -> int:
        return self.peak_bytes - self.unseen_free_bytes


def live_cpu_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages of all tensors the garbage collector can see.

    Views share their base's storage and count once; tensors only C++ holds (for example autograd's
    saved tensors of a graph still alive) are not seen, so call it between steps.
    """
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        # type() rather than isinstance: some module proxies warn when their __class__ is read
        if not issubclass(type(obj), torch.Tensor) or obj.device.type != "cpu":
            continue
        try:
            storage = obj.untyped_storage()
            size = storage.nbytes()
            if size:  # FSDP frees gathered parameters by resizing their storage to 0
                storages[storage.data_ptr()] = size
        except (RuntimeError, NotImplementedError, TypeError):
            continue  # wrapper subclasses (DTensor: its local shard is counted), sparse tensors
    return sum(storages.values())


def _allocation_events(profiler: torch.profiler.profile) -> list[tuple[int, int]]:
    """(time ns, +bytes allocated / -bytes freed) of every CPU allocator event, in time order."""
    from torch._C._profiler import _EventType  # the profiler's event kinds (no public alias yet)

    tree = profiler.profiler.kineto_results.experimental_event_tree()
    events, stack = [], list(tree)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
    return sorted(events)


def measure_cpu_peak_memory(function: Callable[[], Result]) -> tuple[Result, PeakMemory]:
    """Run `function()` and return its result with the peak CPU tensor memory while it ran.

    Frees of memory allocated before the measurement started are invisible to the profiler, so
    measure from a state whose long-lived tensors (model, optimizer state) stay alive throughout:
    an optimizer step after the first one, for instance. Frees on threads other than the caller's
    are invisible too (gloo runs collectives on its own threads and sometimes drops the last
    reference there): the bytes left over at the end that no tensor holds are reported as
    `unseen_free_bytes`, and the true peak lies between `peak_bytes_lower_bound` and `peak_bytes`.
    """
    gc.collect()
    baseline = live_cpu_tensor_bytes()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        result = function()
    live = peak = 0
    for _, change in _allocation_events(profiler):
        live += change
        peak = max(peak, live)
    gc.collect()
    visible_end = live_cpu_tensor_bytes() - baseline
    return result, PeakMemory(baseline, peak, live, unseen_free_bytes=max(0, live - visible_end))


def cuda_peak_memory(device: torch.device | int | None = None) -> dict[str, float]:
    """This process's CUDA allocator peaks since its start (or the last reset), in decimal GB:
    {"cuda_peak_allocated_gb" (tensors), "cuda_peak_reserved_gb" (what the caching allocator holds,
    the figure an out-of-memory compares with the GPU's memory)}; {} where CUDA was never used, so
    a CPU run neither initialises CUDA nor reports zeros."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {"cuda_peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "cuda_peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
