"""Per-step phase timers for the train loop: where each optimizer step's wall time went.

    timer = PhaseTimer(synchronize=True, device=device)
    timer.start_step()
    with timer.phase("data"): ...
    with timer.phase("rollout"):
        ...
        with timer.phase("reward"): ...   # nested: counted as reward, not also as rollout
    metrics.update(timer.step_metrics())  # time_data, time_rollout, time_reward, time_other, time_step

Time is exclusive: an open phase is paused while a phase inside it runs, so the phases and
`time_other` (what no phase covered) add up to `time_step` exactly. GPU work is asynchronous, so
with `synchronize=True` on a CUDA device every phase boundary waits for the device: the time of a
kernel then lands in the phase that launched it (at the cost of the overlap the waits remove).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch

# the trainer's phases, in order; any other name works too
PHASES = ("data", "rollout", "reward", "publish", "forward", "backward", "optimizer", "checkpoint")


class PhaseTimer:
    def __init__(self, synchronize: bool = False, device: torch.device | str | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        """synchronize: wait for `device` at phase boundaries (only does anything on CUDA).
        clock: seconds, monotonic (tests pass a fake one)."""
        self.device = torch.device(device) if device is not None else None
        self.synchronize = synchronize and self.device is not None and self.device.type == "cuda"
        self.clock = clock
        self._totals: dict[str, float] = {}
        self._stack: list[str] = []  # open phases, innermost last
        self._mark = 0.0  # when the innermost open phase (or the gap between phases) last resumed
        self._step_start: float | None = None

    def _now(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize(self.device)
        return self.clock()

    def _charge(self, now: float) -> None:
        """Add the time since the last boundary to the innermost open phase (or to none)."""
        if self._stack:
            name = self._stack[-1]
            self._totals[name] = self._totals.get(name, 0.0) + (now - self._mark)
        self._mark = now

    def start_step(self) -> None:
        """Begin a step now, unless one is already running: a phase after `step_metrics` (a
        checkpoint saved after the step was logged) opens the next step, which keeps it."""
        if self._step_start is not None:
            return
        self._totals = {name: 0.0 for name in self._totals}
        self._step_start = self._mark = self._now()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not isinstance(name, str) or not name or name in ("other", "step"):
            raise ValueError(f"PhaseTimer.phase: expected a non-empty name other than 'other' and "
                             f"'step' (those metrics are computed), got {name!r}")
        if self._step_start is None:
            self.start_step()
        self._charge(self._now())
        self._stack.append(name)
        self._totals.setdefault(name, 0.0)
        try:
            yield
        finally:
            self._charge(self._now())
            self._stack.pop()

    def step_metrics(self) -> dict[str, float]:
        """End the step: `time_<phase>` per phase (0.0 for phases of earlier steps not run in this
        one, so the metric columns stay the same), `time_other` and `time_step`, in seconds."""
        if self._stack:
            raise RuntimeError(f"PhaseTimer.step_metrics: phases still open: {self._stack}")
        if self._step_start is None:
            raise RuntimeError("PhaseTimer.step_metrics: no step was started (no phase ran)")
        end = self._now()
        step = end - self._step_start
        covered = sum(self._totals.values())
        metrics = {f"time_{name}": value for name, value in self._totals.items()}
        # the gaps between phases; exact up to float rounding, which must not make it negative
        metrics["time_other"] = max(0.0, step - covered)
        metrics["time_step"] = step
        self._step_start = None
        return metrics
