"""Messages between the roles of a disaggregated job: a JSON header plus named tensors.

A message travels as three point-to-point transfers on the job's gloo group (sizes, header bytes,
payload bytes), so any mix of dtypes and shapes crosses in one payload. Sends are non-blocking and
their buffers are kept until delivered; receives wait at most a timeout and then fail with an error
that names the peer rank and what was awaited, so a dead or hung peer never leaves a rank waiting.
"""

from __future__ import annotations

import datetime
import json
import threading

import torch
import torch.distributed as dist

_TAG = 7  # one tag: transfers between two ranks arrive in the order they were sent


class PeerError(RuntimeError):
    """A peer rank sent nothing within the timeout, or its connection broke."""


def pack(tensors: dict[str, torch.Tensor]) -> tuple[list[list], torch.Tensor]:
    """Named tensors -> (layout [[name, dtype, shape, offset, nbytes]...], one uint8 CPU buffer)."""
    layout, pieces, offset = [], [], 0
    for name, tensor in tensors.items():
        flat = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        layout.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset,
                       flat.numel()])
        pieces.append(flat)
        offset += flat.numel()
    return layout, torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8)


def unpack(layout: list[list], payload: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for name, dtype, shape, offset, nbytes in layout:
        chunk = payload[offset: offset + nbytes]
        out[name] = chunk.view(getattr(torch, dtype)).reshape(shape)
    return out


class Channel:
    """Header + tensors to and from other ranks of the job group."""

    def __init__(self, group: dist.ProcessGroup, rank: int, timeout_s: float):
        self.group, self.rank, self.timeout_s = group, rank, timeout_s
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        # a rollout rank sends from its scoring thread while its main thread receives: operations
        # are posted under this lock (the waits happen outside it)
        self._lock = threading.Lock()

    def send(self, dst: int, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        layout, payload = pack(tensors or {})
        data = torch.frombuffer(bytearray(json.dumps({**header, "_layout": layout}).encode()),
                                dtype=torch.uint8)
        sizes = torch.tensor([data.numel(), payload.numel()], dtype=torch.int64)
        with self._lock:
            for buffer in (sizes, data, payload):
                if buffer.numel():
                    try:
                        self._pending.append((self.group.send([buffer], dst, _TAG), buffer))
                    except RuntimeError as error:  # the peer's connection is already gone
                        raise PeerError(f"rank {self.rank}: could not send to job rank {dst}: its "
                                        f"connection broke, the rank died: {error}") from error
            self._reap()

    def _reap(self) -> None:
        self._pending = [(work, buffer) for work, buffer in self._pending if not work.is_completed()]

    def _wait(self, work: dist.Work, src: int, what: str, timeout_s: float) -> None:
        try:
            work.wait(datetime.timedelta(seconds=timeout_s))
        except RuntimeError as error:
            raise PeerError(f"rank {self.rank}: job rank {src} sent no {what} within {timeout_s:.0f} s "
                            f"(rollout.timeout_s), or its connection broke; the rank died or "
                            f"hangs: {error}") from error

    def recv(self, src: int, what: str, timeout_s: float | None = None
             ) -> tuple[dict, dict[str, torch.Tensor]]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        sizes = torch.zeros(2, dtype=torch.int64)
        self._wait(self._post_recv(sizes, src), src, what, timeout_s)
        data = torch.empty(int(sizes[0]), dtype=torch.uint8)
        self._wait(self._post_recv(data, src), src, what, timeout_s)
        payload = torch.empty(int(sizes[1]), dtype=torch.uint8)
        if payload.numel():
            self._wait(self._post_recv(payload, src), src, what, timeout_s)
        header = json.loads(bytes(data.numpy()).decode())
        return header, unpack(header.pop("_layout"), payload)

    def _post_recv(self, buffer: torch.Tensor, src: int) -> dist.Work:
        with self._lock:
            return self.group.recv([buffer], src, _TAG)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every send was delivered."""
        with self._lock:
            pending, self._pending = self._pending, []
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        for work, _ in pending:
            try:
                work.wait(datetime.timedelta(seconds=timeout_s))
            except RuntimeError as error:
                raise PeerError(f"rank {self.rank}: a message was not delivered within {timeout_s:.0f} s, "
                                f"or a receiving rank's connection broke: {error}") from error
