"""The torch.distributed world of a job: started by torchrun (or srun + torchrun), or one process.

Backend and device follow the hardware (nccl + cuda:LOCAL_RANK on GPUs, gloo + cpu otherwise);
every collective carries the configured timeout, and a failed or timed-out collective is re-raised
with the rank and the operation named, so a multi-node hang ends with a message, not silence.

Each backend communicates tensors of one device only (nccl: CUDA, gloo: CPU); a tensor made on the
default device (the CPU) meets "no backend for device cpu" under nccl at the first step of a GPU
run. So `collective(..., tensors=...)` checks the tensors it is given against the device the
group's backend serves (`backend_device`) and names the operation, and every tensor that ddrl_scale
hands to a collective is made on `World.device`. On a CPU test machine the two devices are one;
tests/test_zz_gpu_readiness.py runs the call sites with the default device set to "meta" so that a
tensor made without `device=world.device` is caught there too.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device_request: str = "auto", timeout_s: float = 600.0,
               store: dist.Store | None = None) -> World:
    """Join the torchrun world (RANK / WORLD_SIZE / LOCAL_RANK in the environment), or be alone.

    `store`: rendezvous on this store instead of env:// (a role of a disaggregated job, whose
    RANK / WORLD_SIZE are the role's: see parallel/roles.py)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_request == "cuda" or (device_request == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but torch sees no CUDA device; use run.device=cpu or auto")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # a role of one rank still gets its group: libraries that init their own would hit the job's store
    if (world_size > 1 or store is not None) and not dist.is_initialized():
        extra = {} if store is None else {"store": store, "rank": rank, "world_size": world_size}
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s), **extra)
        logger.info("joined a world of %d ranks (%s)", world_size, dist.get_backend())
    return World(rank, world_size, local_rank, device)


Group = dist.ProcessGroup | None


def backend_device(group: Group | object = None) -> torch.device | None:
    """The device whose tensors the group's backend communicates (nccl: the current CUDA device,
    gloo: the CPU); None for a backend that serves several or that this package does not know.
    `group` may also be a bare backend object (the publish group of parallel/roles.py)."""
    if group is None or isinstance(group, dist.ProcessGroup):
        name = str(dist.get_backend(group))
    else:
        name = group.name()
    name = name.lower()
    if name == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if name == "gloo":
        return torch.device("cpu")
    return None


def check_devices(operation: str, tensors: Sequence[torch.Tensor], group: Group | object = None) -> None:
    """Raise, naming the operation, if a tensor is not on the device the group's backend serves."""
    expected = backend_device(group)
    if expected is None:
        return
    for tensor in tensors:
        device = tensor.device
        if device.type != expected.type or (expected.index is not None and device.index != expected.index):
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise RuntimeError(
                f"rank {rank}: collective '{operation}' was given a tensor on {device}, but its "
                f"process group's backend communicates {expected} tensors only; make the tensor "
                f"on world.device (parallel/distributed.py)")


def check_object_device(operation: str, world: World, group: Group = None) -> None:
    """Object collectives (all_gather_object, ...) pickle into tensors on the current CUDA device
    under nccl: that must be this rank's device (init_world sets it), or ranks would share a GPU."""
    if world.world_size == 1:  # one process: no process group, no collective runs
        return
    if backend_device(group) is None or backend_device(group).type != "cuda":
        return
    current = torch.cuda.current_device()
    if world.device.type != "cuda" or world.device.index != current:
        raise RuntimeError(f"rank {world.rank}: object collective '{operation}' under nccl runs on "
                           f"the current CUDA device cuda:{current}, but this rank's device is "
                           f"{world.device}; call torch.cuda.set_device(world.device) first "
                           f"(init_world does)")


def collective(operation: str, function: Callable[[], T], tensors: Sequence[torch.Tensor] = (),
               group: Group | object = None) -> T:
    """Run a collective; a failure (timeout, dead peer) becomes an error naming rank and operation.

    `tensors`: the tensors it communicates, checked first against the device `group`'s backend
    serves (see check_devices)."""
    if tensors:
        check_devices(operation, tensors, group)
    try:
        return function()
    except (RuntimeError, dist.DistBackendError) as error:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise RuntimeError(f"rank {rank}: collective '{operation}' failed (a peer rank died, hung "
                           f"or timed out; see parallel.timeout_s): {error}") from error


def reduce_metrics(metrics: dict[str, float], world: World) -> dict[str, float]:
    """Mean over ranks of every metric; keys ending in '_max' or '_max_dev' take the max."""
    if not world.distributed:
        return metrics
    keys = sorted(metrics)
    # on world.device: under nccl a CPU tensor has no backend (issue 16)
    values = torch.tensor([float(metrics[key]) for key in keys], dtype=torch.float64,
                          device=world.device)
    maxima = values.clone()
    collective("all_reduce(metrics)", lambda: dist.all_reduce(values, op=dist.ReduceOp.SUM), [values])
    collective("all_reduce(metrics max)", lambda: dist.all_reduce(maxima, op=dist.ReduceOp.MAX),
               [maxima])
    sums, peaks = values.tolist(), maxima.tolist()  # one device-to-host copy each
    out = {}
    for index, key in enumerate(keys):
        is_max = key.endswith("_max") or key.endswith("_max_dev")
        out[key] = peaks[index] if is_max else sums[index] / world.world_size
    return out


def barrier(world: World, operation: str = "barrier") -> None:
    if world.distributed:
        collective(operation, dist.barrier)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
