"""Weight publishing: trainers -> rollout ranks after an optimizer step, tagged with a version.

Every trainer walks `Engine.full_weights` (for a sharded engine each tensor is gathered by a
collective of the trainers, one at a time); trainer rank 0 packs the whole tensors into buckets of
`rollout.publish_bucket_mb` and broadcasts each bucket, after a small header naming its tensors, on
the publish group (trainer 0 + rollout ranks). No rank ever holds more than one bucket beyond its
model, whatever the engine.

A dead or hung member ends a publish with an error, never a hang. On gloo `Work.wait()` raises at
the group's timeout. On NCCL it does not: it only makes the current CUDA stream wait, and NCCL's
watchdog later tears the whole process down at the group's timeout. So every broadcast waits with
an explicit timeout, which makes NCCL block the CPU thread, abort its communicators on expiry and
raise (torch's `Work.wait(timeout)`); that wait ends at `WAIT_FRACTION` of the group's timeout
(rollout.timeout_s, parallel/roles.py), before the watchdog would end the process.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ddrl_scale.parallel.distributed import check_devices
from ddrl_scale.parallel.engine import Engine
from ddrl_scale.parallel.inference_tp import load_full
from ddrl_scale.parallel.roles import Roles
from ddrl_scale.rollout.transport import PeerError


def publish_dtype(run_dtype: str) -> torch.dtype:
    """The rollout copy's dtype: bf16 when the run computes in bf16 (half the bytes to move)."""
    return torch.bfloat16 if run_dtype == "bf16" else torch.float32


def tensor_digest(tensor: torch.Tensor) -> str:
    # a copy: numpy() makes the storage it shares non-resizable, and a gathered FSDP2 tensor may
    # share the storage FSDP frees after the backward
    data = tensor.detach().cpu().clone().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def combine_digests(digests: dict[str, str]) -> str:
    """One checksum of named tensors, independent of the order they were met in."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def weights_checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    return combine_digests({name: tensor_digest(tensor) for name, tensor in named})


WAIT_FRACTION = 0.9  # of the group's timeout: the blocking wait gives up before NCCL's watchdog


def wait_timeout(group: dist.ProcessGroup) -> datetime.timedelta:
    """How long a publish broadcast waits, on the CPU thread, for the group (see the docstring)."""
    timeout = getattr(getattr(group, "options", None), "_timeout", None)
    return (timeout if timeout is not None else dist.default_pg_timeout) * WAIT_FRACTION


def _broadcast(group: dist.ProcessGroup, tensor: torch.Tensor) -> None:
    """Broadcast from trainer rank 0; a dead or hung member ends it with an error, never a hang
    (the publish group carries rollout.timeout_s)."""
    check_devices("weight publish broadcast", [tensor], group)
    options = dist.BroadcastOptions()
    options.rootRank = 0
    try:
        # an explicit timeout: NCCL's wait() without one returns before the broadcast has happened
        if not group.broadcast([tensor], options).wait(wait_timeout(group)):
            raise RuntimeError(f"the wait gave up after {wait_timeout(group)}")
    except RuntimeError as error:
        raise PeerError(f"weight publish: the broadcast between trainer rank 0 and the rollout ranks "
                        f"failed or timed out (rollout.timeout_s); a rank died or hangs: {error}"
                        ) from error


def _broadcast_header(group: dist.ProcessGroup, device: torch.device, header: dict | None) -> dict:
    """Root sends `header`; the others receive it."""
    data = json.dumps(header).encode() if header is not None else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    _broadcast(group, size)
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if header is not None
              else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    _broadcast(group, buffer)
    return header if header is not None else json.loads(bytes(buffer.cpu().numpy()).decode())


def _send_bucket(group: dist.ProcessGroup, device: torch.device,
                 bucket: list[tuple[str, torch.Tensor]]) -> int:
    layout, pieces, offset = [], [], 0
    for name, tensor in bucket:
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        layout.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset,
                       flat.numel()])
        pieces.append(flat)
        offset += flat.numel()
    _broadcast_header(group, device, {"layout": layout, "nbytes": offset})
    _broadcast(group, torch.cat(pieces).to(device))
    return offset


def publish_weights(engine: Engine, roles: Roles, version: int, bucket_bytes: int,
                    dtype: torch.dtype, device: torch.device, verify: bool) -> dict:
    """Every trainer calls. Returns {"checksum" (when verify), "bytes", "buckets", "seconds"}."""
    try:
        return _publish(engine, roles, version, bucket_bytes, dtype, device, verify)
    except PeerError as error:
        ranks = ", ".join(f"job rank {rank}" for rank in roles.rollout_ranks)
        raise PeerError(f"publish of weights version {version} to the rollout ranks ({ranks}): "
                        f"{error}") from error


def _publish(engine: Engine, roles: Roles, version: int, bucket_bytes: int, dtype: torch.dtype,
             device: torch.device, verify: bool) -> dict:
    start = time.perf_counter()
    sender = roles.publish if roles.is_controller else None
    bucket, size, digests, total, buckets = [], 0, {}, 0, 0
    for name, tensor in engine.full_weights(dtype=dtype):
        if verify:
            digests[name] = tensor_digest(tensor)
        if sender is None:
            continue  # this trainer only helped gather the sharded tensor
        bucket.append((name, tensor.to(device)))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            total, buckets, bucket, size = total + _send_bucket(sender, device, bucket), buckets + 1, [], 0
    if sender is not None:
        if bucket:
            total, buckets = total + _send_bucket(sender, device, bucket), buckets + 1
        _broadcast_header(sender, device, {"end": True, "version": version})
    return {"checksum": combine_digests(digests) if verify else None, "bytes": total,
            "buckets": buckets, "seconds": time.perf_counter() - start}


@torch.no_grad()
def receive_weights(model: nn.Module, group: dist.ProcessGroup, device: torch.device) -> int:
    """A rollout rank's side of `publish_weights`: load every tensor into `model`; return the version."""
    parameters = dict(model.named_parameters())
    received: set[str] = set()
    while True:
        header = _broadcast_header(group, device, None)
        if header.get("end"):
            break
        buffer = torch.empty(header["nbytes"], dtype=torch.uint8, device=device)
        _broadcast(group, buffer)
        for name, dtype, shape, offset, nbytes in header["layout"]:
            if name not in parameters:
                raise KeyError(f"published weight '{name}' is not a parameter of the rollout model: "
                               f"the trainers' and rollout ranks' model configs differ")
            target = parameters[name]
            value = buffer[offset: offset + nbytes].view(getattr(torch, dtype)).reshape(shape)
            if tuple(target.shape) != tuple(shape):
                raise ValueError(f"published weight '{name}' has shape {tuple(shape)}, the rollout "
                                 f"model's has {tuple(target.shape)}")
            load_full(target, value)  # a tensor-parallel copy keeps its shard
            received.add(name)
    missing = sorted(set(parameters) - received)
    if missing:
        raise KeyError(f"the publish of version {header['version']} lacked {len(missing)} weights of "
                       f"the rollout model, first '{missing[0]}'")
    return int(header["version"])
