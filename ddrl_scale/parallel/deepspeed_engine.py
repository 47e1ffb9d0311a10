"""The "deepspeed" engine: ZeRO-2 / ZeRO-3 (optional CPU optimizer offload) behind the Engine API.

The DeepSpeed config is generated from ours (optimizer, clipping, precision, ZeRO stage) and, when
`parallel.deepspeed_config` names a JSON file, that file is merged over it (the user's keys win,
except the batch-size keys, which follow the run). The trainer calls `backward` once per trained
denoising step and `step` once per iteration; DeepSpeed's gradient-accumulation boundary is set to
that count, so its optimizer step happens on the last backward of the iteration.

DeepSpeed JIT-builds (or loads) its C++ ops through torch's extension loader, which takes a `lock`
file in the op's folder under TORCH_EXTENSIONS_DIR and waits, silently and forever, while one
exists; a run killed during that build leaves the lock. `check_extension_locks` looks before the
engine is built and names the file to remove, and the build runs under a deadline that names its
phase (`build_deadline`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ddrl_scale.config.schema import OptimSection, ParallelSection
from ddrl_scale.parallel.distributed import World, collective
from ddrl_scale.parallel.ema import ema_decay_at, ema_enabled
from ddrl_scale.parallel.engine import Engine, lr_factor, register_engine
from ddrl_scale.runtime import autocast
from ddrl_scale.storage.safe_load import check_deepspeed_files, deepspeed_weights_only, load_pt

logger = logging.getLogger(__name__)

TAG = "checkpoint"  # one DeepSpeed tag per checkpoint folder
# a lock whose build folder has not changed for this long has no live builder: a build of these
# ops writes its objects within a minute or two
STALE_LOCK_S = 300.0


def extension_ops(parallel: ParallelSection) -> list[str]:
    """The C++ ops DeepSpeed builds for this engine on first use: the shared-memory collectives of
    its CPU accelerator, and CPU Adam when the optimizer is offloaded."""
    ops = [] if torch.cuda.is_available() else ["deepspeed_shm_comm"]
    return ops + (["cpu_adam"] if parallel.offload_optimizer else [])


def extension_lock(op: str) -> Path:
    """The lock torch's extension loader takes while it builds `op` (TORCH_EXTENSIONS_DIR/.../op/lock)."""
    from torch.utils.cpp_extension import _get_build_directory  # the loader's own folder rule

    return Path(_get_build_directory(op, verbose=False)) / "lock"


def _newest_change(folder: Path) -> float:
    return max((entry.stat().st_mtime for entry in folder.iterdir()), default=0.0)


def check_extension_locks(ops: list[str], wait_s: float, stale_s: float = STALE_LOCK_S) -> None:
    """Raise, naming the lock file, instead of letting torch wait on it forever: at once for a lock
    whose build folder has not changed for `stale_s` (its builder died), else after `wait_s` if a
    live build (another rank, another run) still holds it."""
    deadline = time.monotonic() + wait_s
    for op in ops:
        lock = extension_lock(op)
        while lock.exists():
            idle = time.time() - _newest_change(lock.parent)
            if idle > stale_s:
                raise RuntimeError(
                    f"stale torch-extension lock '{lock}': the build of DeepSpeed's '{op}' op that "
                    f"took it stopped {idle:.0f} s ago (a killed run leaves it) and torch would wait "
                    f"on it forever; remove that file and start again")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"torch-extension lock '{lock}' is still held after {wait_s:.0f} s: another "
                    f"process is building DeepSpeed's '{op}' op; wait for it, or remove the file if "
                    f"no such build is running")
            time.sleep(0.5)


@contextlib.contextmanager
def build_deadline(phase: str, timeout_s: float) -> Iterator[None]:
    """Raise TimeoutError naming `phase` if the block runs longer than `timeout_s` (main thread
    only, through SIGALRM: the waits it guards are Python loops and blocking C++ builds)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: object) -> None:
        root = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
        raise TimeoutError(f"deepspeed engine: phase '{phase}' did not finish in {timeout_s:.0f} s "
                           f"(parallel.timeout_s); a torch-extension build may be stuck: see the "
                           f"'lock' files under {root}")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def deepspeed_config(optim: OptimSection, parallel: ParallelSection, dtype: str, world_size: int,
                     accumulation_steps: int) -> dict:
    """Our settings as a DeepSpeed config dict, with `parallel.deepspeed_config` merged over it."""
    zero = {"stage": parallel.zero_stage}
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config = {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: the trainer forms its batches
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": accumulation_steps * world_size,
        "gradient_clipping": optim.grad_clip,
        # torch's AdamW unless offloaded (then DeepSpeed's CPU Adam, a C++ op built on first use)
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
            "weight_decay": optim.weight_decay, "torch_adam": not parallel.offload_optimizer}},
        "bf16": {"enabled": dtype == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if parallel.deepspeed_config:
        path = Path(parallel.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"parallel.deepspeed_config: '{path}' does not exist")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"parallel.deepspeed_config: '{path}' is not valid JSON: {error}") from None
        config = _merge(config, user)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            if key in user:
                logger.warning("parallel.deepspeed_config sets %s; the run's value is used", key)
        config.update({"train_micro_batch_size_per_gpu": 1,
                       "gradient_accumulation_steps": accumulation_steps,
                       "train_batch_size": accumulation_steps * world_size})
    return config


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def _local(param: nn.Parameter) -> torch.Tensor:
    """The part of a parameter this rank holds: its ZeRO-3 partition, or the whole tensor."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


@register_engine("deepspeed")
class DeepSpeedEngine(Engine):
    def __init__(self, model: nn.Module, optim: OptimSection, parallel: ParallelSection, world: World,
                 dtype: str = "fp32", accumulation_steps: int = 1):
        os.environ.setdefault("DS_BUILD_OPS", "0")  # C++ ops build lazily, cached in TORCH_EXTENSIONS_DIR
        check_extension_locks(extension_ops(parallel), wait_s=parallel.timeout_s)
        import deepspeed

        if not dist.is_initialized():  # DeepSpeed always wants a process group, even of one
            raise RuntimeError("parallel.engine=deepspeed needs torch.distributed: start the run with "
                               "torchrun (also for one process: torchrun --nproc_per_node=1)")
        self.world, self.dtype, self.device = world, dtype, world.device
        self.accumulation_steps, self.micro_step = accumulation_steps, 0
        self.config = deepspeed_config(optim, parallel, dtype, world.world_size, accumulation_steps)
        self.model = model.to(world.device)
        # builds or loads the C++ ops (the locks above) and sets up ZeRO
        with build_deadline("deepspeed.initialize (C++ ops build, ZeRO setup)", parallel.timeout_s):
            self.ds, self.optimizer, _, self.schedule = deepspeed.initialize(
                model=self.model, model_parameters=self.model.parameters(), config=self.config,
                lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lr_factor(optim)),
                dist_init_required=False)
        self.zero3 = parallel.zero_stage == 3
        self.optim = optim
        self.ema = ({name: _local(p).detach().float().clone() for name, p in self.model.named_parameters()}
                    if ema_enabled(optim) else None)
        self.grad_norm = 0.0

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):  # bf16: DeepSpeed holds bf16 params, inputs follow
            return self.ds(*args)

    def backward(self, loss: torch.Tensor) -> None:
        # the trainer already divides by the number of trained steps
        collective("deepspeed backward", lambda: self.ds.backward(loss, scale_wrt_gas=False))
        self.micro_step += 1
        if self.micro_step > self.accumulation_steps:
            raise RuntimeError(f"deepspeed engine: {self.micro_step} backward calls in one iteration, "
                               f"configured for {self.accumulation_steps}")
        collective("deepspeed step", self.ds.step)  # a real optimizer step only on the boundary

    def step(self) -> float:
        if self.micro_step != self.accumulation_steps:
            raise RuntimeError(f"deepspeed engine: step() after {self.micro_step} backward calls, "
                               f"expected {self.accumulation_steps}")
        self.micro_step = 0
        norm = self.ds.get_global_grad_norm()
        self.grad_norm = float(norm) if norm is not None else float("nan")
        if self.ema is not None:  # DeepSpeed counts its optimizer steps (and checkpoints them)
            decay = ema_decay_at(self.optim, self.ds.global_steps - 1)
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    self.ema[name].lerp_(_local(param).float(), 1.0 - decay)
        return self.grad_norm

    def save(self, directory: Path) -> None:
        collective("deepspeed save_checkpoint",
                   lambda: self.ds.save_checkpoint(str(directory / "deepspeed"), tag=TAG))
        if self.ema is not None:
            shapes = {name: list(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                      for name, p in self.model.named_parameters()}
            torch.save({"zero3": self.zero3, "world_size": self.world.world_size, "shapes": shapes,
                        "tensors": self.ema}, directory / f"ema_rank{self.world.rank}.pt")

    def load(self, directory: Path) -> None:
        if not (directory / "deepspeed" / TAG).is_dir():
            raise FileNotFoundError(f"checkpoint '{directory}' has no DeepSpeed state "
                                    f"(deepspeed/{TAG}); was it written by another engine?")
        check_deepspeed_files(directory / "deepspeed" / TAG)  # on every rank: one verdict for all
        with deepspeed_weights_only():  # DeepSpeed's own reads use weights_only=False
            path, _ = collective("deepspeed load_checkpoint",
                                 lambda: self.ds.load_checkpoint(str(directory / "deepspeed"), tag=TAG))
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load '{directory / 'deepspeed'}'")
        if self.ema is not None:
            saved = load_pt(directory / f"ema_rank{self.world.rank}.pt")
            if saved["zero3"] and saved["world_size"] != self.world.world_size:
                raise ValueError(f"the ZeRO-3 EMA in '{directory}' was saved by {saved['world_size']} "
                                 f"ranks; resume with the same number")
            self.ema = {name: tensor.to(self.device) for name, tensor in saved["tensors"].items()}

    def _gather_partition(self, partition: torch.Tensor, shape: list[int]) -> torch.Tensor:
        pieces = [torch.empty_like(partition) for _ in range(self.world.world_size)]
        dist.all_gather(pieces, partition.contiguous())
        return torch.cat(pieces)[: math.prod(shape)].view(shape)

    def full_weights(self, dtype: torch.dtype | None = None, ema: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        import deepspeed

        if ema and self.ema is None:
            raise ValueError("EMA weights requested but the EMA is off (optim.ema_decay = 0)")
        for name, param in self.model.named_parameters():
            if ema:
                tensor = self.ema[name]
                if self.zero3:
                    tensor = collective(f"all_gather(ema {name})", lambda t=tensor, p=param:
                                        self._gather_partition(t, list(p.ds_shape)))
            elif self.zero3:
                with deepspeed.zero.GatheredParameters([param]):
                    tensor = param.data.detach().clone()
            else:
                tensor = param.data.detach()
            yield name, tensor.to(dtype) if dtype is not None else tensor

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]
