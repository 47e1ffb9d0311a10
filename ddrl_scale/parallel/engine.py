"""One Engine interface for every way of holding the policy: the trainer never knows which runs.

An engine wraps a plain model and owns its optimizer, learning-rate schedule, grad clipping and EMA:
the "optimizer step -> EMA -> checkpoint -> weight publish" stage of the data flow. Torch-native
engines ("none", "fsdp2") save and load through torch.distributed.checkpoint (DCP) with the plain
model's parameter names, so a checkpoint written by one engine or world size loads in another.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from ddrl_scale.config.schema import ConfigError, OptimSection, ParallelSection
from ddrl_scale.parallel.distributed import World, collective
from ddrl_scale.parallel.ema import EMA, ema_decay_at, ema_enabled
from ddrl_scale.runtime import autocast
from ddrl_scale.storage.safe_load import dcp_load, load_pt

logger = logging.getLogger(__name__)

_ENGINES: dict[str, type[Engine]] = {}


def register_engine(name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        _ENGINES[name] = cls
        return cls

    return decorator


def available_engines() -> list[str]:
    return sorted(_ENGINES)


def build_engine(model: nn.Module, optim: OptimSection, parallel: ParallelSection, world: World,
                 dtype: str = "fp32", accumulation_steps: int = 1) -> Engine:
    """accumulation_steps: backward calls per optimizer step (the trained denoising steps)."""
    if parallel.engine not in _ENGINES:
        raise ValueError(f"parallel.engine: unknown engine '{parallel.engine}'; "
                         f"registered: {available_engines()}")
    return _ENGINES[parallel.engine](model, optim, parallel, world, dtype,
                                     accumulation_steps=accumulation_steps)


def lr_factor(optim: OptimSection) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over optim.warmup_steps, then constant, or a
    cosine decay to 0 at optim.decay_steps when that is > 0."""
    warmup, decay = optim.warmup_steps, optim.decay_steps

    def factor(step: int) -> float:
        rise = min(1.0, (step + 1) / warmup) if warmup else 1.0
        fall = 0.5 * (1.0 + math.cos(math.pi * min(step, decay) / decay)) if decay else 1.0
        return rise * fall

    return factor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathers a DTensor shard (a collective), returns a plain tensor as is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save/load; that is the intended use here, not a problem."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Engine(abc.ABC):
    model: nn.Module

    @abc.abstractmethod
    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        """Run the policy (under the run's precision policy)."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def step(self) -> float:
        """Clip gradients, optimizer and schedule step, EMA update, zero grads; return the grad norm."""

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Write model, optimizer, EMA and schedule state under `directory` (every rank calls)."""

    @abc.abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what `save` wrote, whatever engine or world size wrote it (every rank calls)."""

    @abc.abstractmethod
    def full_weights(self, dtype: torch.dtype | None = None, ema: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) one at a time, every rank calls: what the rollout side loads.

        Sharded engines gather one tensor at a time, so no rank ever holds a second whole model.
        """

    @property
    @abc.abstractmethod
    def lr(self) -> float: ...


class TorchEngine(Engine):
    """A torch optimizer over the (possibly sharded) module; `wrap` applies the parallelism."""

    def __init__(self, model: nn.Module, optim: OptimSection, parallel: ParallelSection, world: World,
                 dtype: str = "fp32", accumulation_steps: int = 1):
        # gradients accumulate in .grad between step() calls: accumulation_steps needs no bookkeeping
        self.world, self.dtype, self.grad_clip, self.device = world, dtype, optim.grad_clip, world.device
        self.model = self.wrap(model.to(world.device), parallel)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr,
                                           betas=tuple(optim.betas), eps=optim.eps,
                                           weight_decay=optim.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                          lr_factor(optim))
        self.optim = optim
        self.ema = EMA(self.model, optim.ema_decay) if ema_enabled(optim) else None
        self.nonfinite = 0  # gradient elements zeroed by optim.force_finite_grads in the last step

    def wrap(self, model: nn.Module, parallel: ParallelSection) -> nn.Module:
        return model

    def autocast(self):
        return autocast(self.device, self.dtype)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        self.force_finite(parameters)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = collective("clip_grad_norm", lambda: torch.nn.utils.clip_grad_norm_(parameters,
                                                                                         max_norm))
        self.optimizer.step()
        self.finish_step()
        return float(full_tensor(grad_norm))

    def force_finite(self, parameters: list[nn.Parameter]) -> None:
        """optim.force_finite_grads: NaN / inf gradient elements become 0 (this rank's shard),
        counted in self.nonfinite; otherwise nothing."""
        self.nonfinite = 0
        if not self.optim.force_finite_grads:
            return
        for param in parameters:
            grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
            bad = ~torch.isfinite(grad)
            count = int(bad.sum())
            if count:
                grad.masked_fill_(bad, 0.0)
                self.nonfinite += count

    def finish_step(self) -> None:
        """After the optimizer step: the LR schedule, the gradients cleared, the EMA update (its
        decay at this iteration: the schedule counts the steps taken, and is checkpointed)."""
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, ema_decay_at(self.optim, self.schedule.last_epoch - 1))

    def _state(self) -> dict:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        if self.ema is not None:
            state["ema"] = self.ema.shadow
        return state

    def save(self, directory: Path) -> None:
        with _single_process_quiet():
            collective("checkpoint save", lambda: dcp.save(
                self._state(), checkpoint_id=directory / "engine", no_dist=not dist.is_initialized()))
        self.save_schedule(directory)

    def load(self, directory: Path) -> None:
        if not (directory / "engine" / ".metadata").is_file():
            raise FileNotFoundError(f"checkpoint '{directory}' has no engine state (engine/.metadata)")
        state = self._state()
        with _single_process_quiet():  # the safe reader: no code from .metadata or byte items
            collective("checkpoint load", lambda: dcp_load(
                state, directory / "engine", no_dist=not dist.is_initialized()))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if self.ema is not None:
            if "ema" not in state:
                raise KeyError(f"checkpoint '{directory}' has no EMA but the EMA is on (optim.ema_*)")
            self.ema.shadow = state["ema"]
        self.load_schedule(directory)

    def save_schedule(self, directory: Path) -> None:
        if self.world.is_main:
            torch.save({"schedule": self.schedule.state_dict()}, directory / "engine_schedule.pt")

    def load_schedule(self, directory: Path) -> None:
        extra = load_pt(directory / "engine_schedule.pt")
        self.schedule.load_state_dict(extra["schedule"])

    def gather(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The whole of this rank's part `tensor` of parameter `name` (a collective if sharded)."""
        return collective(f"all_gather({name})", lambda: full_tensor(tensor))

    def full_weights(self, dtype: torch.dtype | None = None, ema: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        if ema and self.ema is None:
            raise ValueError("EMA weights requested but the EMA is off (optim.ema_decay = 0)")
        source = self.ema.shadow if ema else dict(self.model.named_parameters())
        for name, tensor in source.items():
            tensor = self.gather(name, tensor.detach())
            yield name, tensor.to(dtype) if dtype is not None else tensor

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


@register_engine("none")
class LocalEngine(TorchEngine):
    """Single process, unsharded: the plain reference every sharded engine is tested against."""

    def __init__(self, model: nn.Module, optim: OptimSection, parallel: ParallelSection, world: World,
                 dtype: str = "fp32", accumulation_steps: int = 1):
        if world.distributed:
            raise ConfigError(f"parallel.engine=none runs in one process, but the world has "
                             f"{world.world_size} ranks; use parallel.engine=fsdp2")
        super().__init__(model, optim, parallel, world, dtype, accumulation_steps)
