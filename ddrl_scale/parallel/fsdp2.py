"""The "fsdp2" engine: parameters, gradients, optimizer state and EMA sharded with FSDP2."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ddrl_scale.config.schema import ParallelSection
from ddrl_scale.parallel.engine import TorchEngine, register_engine
from ddrl_scale.parallel.parallelize import parallelize_video_dit


@register_engine("fsdp2")
class FSDP2Engine(TorchEngine):
    def wrap(self, model: nn.Module, parallel: ParallelSection) -> nn.Module:
        # on GPUs bf16 goes through FSDP2's parameter policy (bf16 compute, fp32 reduce and master
        # weights); on CPUs through autocast, as the unsharded engine does
        self.param_policy = self.dtype == "bf16" and self.device.type == "cuda"
        return parallelize_video_dit(model, parallel, self.world,
                                     torch.bfloat16 if self.param_policy else None)

    def autocast(self):
        return contextlib.nullcontext() if self.param_policy else super().autocast()
