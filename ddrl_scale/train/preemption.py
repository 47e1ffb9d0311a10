"""Stopping a run cleanly: a request to stop reaches the trainer, which finishes its step, checkpoints
and exits.

Place in the data flow: between two optimizer steps of the trainer loop (train/trainer.py), after the
step's metrics and its periodic checkpoint, before the next anchor batch. The ways in:

- SIGINT (Ctrl-C) and SIGTERM (what `scancel`, Kubernetes and most schedulers send first): inside the
  step loop the step in progress finishes, is checkpointed, and the run exits 130 / 143 (128 + the
  signal's number, the shell's convention) with "interrupted at step N; rerun the same command to
  resume" (train/run.py). Outside the loop (model building, the evaluations) no step is in progress
  and the last checkpoint is already on disk, so the signal ends the run at once (`Interrupted`),
  with the same line. A second Ctrl-C ends the run at once wherever it is.
- SIGUSR1 or the file RUN_DIR/.preempt_requested: SLURM's time-limit warning (the batch script
  creates the file, then requeues the job once the trainer has exited cleanly; launchers/slurm/):
  checkpoint after the step and exit 0.

The ranks agree through an all-reduce after every step, of the strongest request any rank saw (a
code below), so they all stop after the same step with the same exit status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ddrl_scale.parallel.distributed import World, collective

STOP_FILE = ".preempt_requested"

# request codes, ordered by strength: the vote takes the maximum over ranks
NONE, PREEMPT, TERMINATE, INTERRUPT = 0, 1, 2, 3
_CODES = {signal.SIGUSR1: PREEMPT, signal.SIGTERM: TERMINATE, signal.SIGINT: INTERRUPT}
EXIT_CODES = {NONE: 0, PREEMPT: 0, TERMINATE: 128 + signal.SIGTERM, INTERRUPT: 128 + signal.SIGINT}
REASONS = {PREEMPT: "preemption requested", TERMINATE: "SIGTERM received", INTERRUPT: "interrupted"}
# torchrun forwards the signal it got to every worker, which the shell (or slurmstepd) has already
# signalled: a copy arrives within milliseconds. A SIGINT later than this after the first one is the
# user pressing Ctrl-C again.
DUPLICATE_S = 1.0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM outside the step loop: nothing in progress is worth finishing."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.code = _CODES[signum]

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.code]


@dataclass
class _State:
    """This process's view of the signals: one per process, as signal handlers are."""

    request: int = NONE  # the strongest request this process received
    agreed: int = NONE  # the result of the last vote over the ranks
    first_signal_at: float | None = None  # monotonic time of the first SIGINT / SIGTERM
    handling: bool = False  # inside handle_signals(): SIGINT and SIGTERM are ours
    graceful: bool = False  # inside the step loop: finish the step, then stop
    owner: int = 0  # the pid that installed the handlers (forked children inherit them)


_state = _State()


def _say(message: str) -> None:
    # os.write, not print: a signal handler may run while the main thread is inside a print
    if int(os.environ.get("RANK", "0")) == 0:
        os.write(2, f"\nddrl: {message}\n".encode())


def _on_signal(signum: int, frame: object) -> None:
    if _state.owner and os.getpid() != _state.owner:
        return  # a forked helper (a DataLoader worker): the run's process decides, and stops it
    code = _CODES[signum]
    if code == PREEMPT:
        _state.request = max(_state.request, PREEMPT)
        return
    now = time.monotonic()
    if _state.first_signal_at is None:
        _state.first_signal_at = now
        _state.request = max(_state.request, code)
        if not _state.graceful:
            raise Interrupted(signum)
        _say(f"{signal.Signals(signum).name}: stopping after the step in progress, with a checkpoint "
             f"(Ctrl-C again to stop at once)")
        return
    if signum == signal.SIGINT and now - _state.first_signal_at > DUPLICATE_S:
        _say("second interrupt: stopping now, without a checkpoint of the step in progress")
        os._exit(EXIT_CODES[INTERRUPT])
    # else a copy of the first signal (see DUPLICATE_S), or SIGTERM after SIGINT: the same request


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGUSR1 handled as this module says, for the duration (one run); the
    previous handlers come back afterwards. Only the main thread can install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _state
    _state = _State(handling=True, owner=os.getpid())
    previous = {sig: signal.signal(sig, _on_signal) for sig in _CODES}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state.handling = False


@contextlib.contextmanager
def graceful() -> Iterator[None]:
    """The step loop: SIGINT / SIGTERM wait for the step in progress instead of raising."""
    before, _state.graceful = _state.graceful, True
    try:
        yield
    finally:
        _state.graceful = before


def exit_code() -> int:
    """The exit status this process's run ends with: 130 / 143 after SIGINT / SIGTERM, else 0."""
    return EXIT_CODES[max(_state.request, _state.agreed)]


class StopRequest:
    def __init__(self, run_dir: str | Path, world: World):
        self.path, self.world = Path(run_dir) / STOP_FILE, world
        if not _state.handling:
            # a trainer driven without handle_signals() (tests, notebooks): a fresh request each
            # time, and SIGUSR1 only, leaving Ctrl-C to the host program
            _state.request = _state.agreed = NONE
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGUSR1, _on_signal)

    @property
    def code(self) -> int:
        return _state.agreed

    @property
    def reason(self) -> str:
        return REASONS.get(self.code, "no stop requested")

    def requested(self) -> bool:
        """True on every rank if any rank got a stop signal or sees the stop file (a collective)."""
        local = max(_state.request, PREEMPT if self.path.is_file() else NONE)
        if self.world.distributed:
            # on the world's device: NCCL has no CPU tensors
            flag = torch.tensor([float(local)], device=self.world.device)
            collective("all_reduce(stop request)", lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX),
                       [flag])
            local = int(flag.item())
        _state.agreed = max(_state.agreed, local)
        return local > NONE
