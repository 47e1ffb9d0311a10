"""Preemption: a request to stop reaches the trainer, which finishes its step, checkpoints and exits.

Two ways in: SIGUSR1 to a trainer process, or the file RUN_DIR/.preempt_requested (the SLURM batch
script creates it when SLURM sends its time-limit warning, then requeues the job once the trainer
has exited cleanly; launchers/slurm/). The ranks agree through an all-reduce after every step, so
they all stop after the same step.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from ddrl_scale.parallel.distributed import World, collective

logger = logging.getLogger(__name__)

STOP_FILE = ".preempt_requested"


class StopRequest:
    def __init__(self, run_dir: str | Path, world: World):
        self.path, self.world, self.signalled = Path(run_dir) / STOP_FILE, world, False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def requested(self) -> bool:
        """True on every rank if any rank got SIGUSR1 or sees the stop file (a collective)."""
        local = self.signalled or self.path.is_file()
        if not self.world.distributed:
            return local
        flag = torch.tensor([1.0 if local else 0.0])
        collective("all_reduce(stop request)", lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX))
        return bool(flag.item())
