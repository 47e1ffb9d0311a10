"""One Engine interface for every way of holding the policy: the trainer never knows which runs.

An engine wraps a plain model and owns its optimizer, learning-rate schedule, grad clipping and EMA:
the "optimizer step -> EMA -> weight publish" stage of the data flow. Sharded engines (FSDP2,
DeepSpeed, Megatron) register themselves here under their `parallel.engine` name.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ddrl_scale.config.schema import OptimSection
from ddrl_scale.runtime import autocast
from ddrl_scale.train.ema import EMA

_ENGINES: dict[str, type[Engine]] = {}


def register_engine(name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        _ENGINES[name] = cls
        return cls

    return decorator


def build_engine(name: str, model: nn.Module, optim: OptimSection, device: torch.device,
                 dtype: str = "fp32") -> Engine:
    if name not in _ENGINES:
        raise ValueError(f"parallel.engine: unknown engine '{name}'; registered: {sorted(_ENGINES)}")
    return _ENGINES[name](model, optim, device, dtype)


def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over warmup_steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


class Engine(abc.ABC):
    model: nn.Module

    @abc.abstractmethod
    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        """Run the policy (under the run's autocast)."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def step(self) -> float:
        """Clip gradients, optimizer and schedule step, EMA update, zero grads; return the grad norm."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything to resume: model, optimizer, schedule, EMA."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @abc.abstractmethod
    def full_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) one parameter at a time: the stream the rollout side loads."""

    @abc.abstractmethod
    def ema_weights(self) -> dict[str, torch.Tensor] | None: ...

    @property
    @abc.abstractmethod
    def lr(self) -> float: ...


@register_engine("none")
class LocalEngine(Engine):
    """Single process, unsharded: the plain reference every sharded engine is tested against."""

    def __init__(self, model: nn.Module, optim: OptimSection, device: torch.device, dtype: str = "fp32"):
        self.model, self.device, self.dtype, self.grad_clip = model.to(device), device, dtype, optim.grad_clip
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                           eps=optim.eps, weight_decay=optim.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                          warmup_constant(optim.warmup_steps))
        self.ema = EMA(model, optim.ema_decay) if optim.ema_decay > 0 else None

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return self.model(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return float(grad_norm)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise KeyError("checkpoint has no EMA state but optim.ema_decay > 0")
            self.ema.load_state_dict(state["ema"])

    def full_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.model.state_dict().items():
            yield name, tensor.detach()

    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        return self.ema.state_dict() if self.ema is not None else None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]
