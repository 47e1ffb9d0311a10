"""Progress bars of a run: the step loop (train/trainer.py) and the fixed-prompt evaluations
(train/evaluate.py), on stderr, rank 0 only, off with train.progress=false.

The step loop's first step in a process compiles kernels (torch.compile, Triton autotuning, the CUDA
extension) and warms allocators; it can take minutes where later steps take seconds, so its time is
kept out of the rate and the ETA, and the bar says what it is doing meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm


class StepProgress:
    """tqdm bar over optimizer steps whose rate and ETA start after this process's first step."""

    def __init__(self, total: int, initial: int, enabled: bool, kernel_backend: str):
        self.bar = tqdm(total=total, initial=initial, desc="ddrl", disable=not enabled)
        self.first = True
        what = "compiling kernels" if kernel_backend != "torch" else "first step"
        self.bar.set_postfix_str(f"{what}; the ETA starts after it")

    def step(self, **postfix: str) -> None:
        """One optimizer step done; `postfix` (reward=..., ...) replaces the bar's figures."""
        self.bar.update(1)
        if self.first:
            self.first = False
            done = self.bar.n
            self.bar.reset()  # restart the clock: the rate is measured from the second step on
            self.bar.initial = self.bar.n = self.bar.last_print_n = done
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()


def counting(velocity: Callable[..., torch.Tensor], steps: int, label: str,
             enabled: bool) -> tuple[Callable[..., torch.Tensor], Callable[[], None]]:
    """`velocity` that also advances a bar of `steps` denoising steps named `label`; and its close."""
    bar = tqdm(total=steps, desc=label, unit="step", disable=not enabled)

    def counted(*args: torch.Tensor) -> torch.Tensor:
        out = velocity(*args)
        bar.update(1)
        return out

    return counted, bar.close
