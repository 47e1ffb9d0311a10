"""Parallelism applied to a plain VideoDiT or the Wan policy from outside: context parallel over
the tokens, activation checkpointing, per-block compile, FSDP2 (per block, then the root) over a
1-D (FSDP, all ranks: data and context parallel ranks alike) or 2-D (HSDP) device mesh.

Parameter names stay those of the plain model (no wrapper prefixes), so checkpoints move freely
between engines and world sizes.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from ddrl_scale.config.schema import ParallelSection
from ddrl_scale.models.wan import WanPolicy
from ddrl_scale.parallel.context_parallel import apply_context_parallel
from ddrl_scale.parallel.distributed import World
from ddrl_scale.parallel.wan_context_parallel import apply_wan_context_parallel

logger = logging.getLogger(__name__)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the unit of sharding, checkpointing and compiling."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no `blocks` list to parallelize")
    return list(blocks)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward (keeps parameter names unchanged)."""
    for block in blocks_of(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: nn.Module) -> None:
    for block in blocks_of(model):
        block.compile()


def data_parallel_mesh(world: World, replicate: int) -> DeviceMesh:
    """1-D mesh (FSDP) for replicate = 1, else 2-D (replicate, shard) mesh for HSDP."""
    if world.world_size % replicate:
        raise ValueError(f"parallel.dp_replicate={replicate} does not divide the world size "
                         f"{world.world_size}")
    device_type = world.device.type
    if replicate == 1:
        return init_device_mesh(device_type, (world.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate, world.world_size // replicate),
                            mesh_dim_names=("replicate", "shard"))


def mixed_precision_policy(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """bf16 parameters (when given) with fp32 gradient reduction, and no cast of forward inputs.

    FSDP2's default `cast_forward_inputs=True` casts every float argument of a sharded module to
    param_dtype: sigma entering the root (two sigmas in one bf16 value give identical outputs) and
    the rotary angles / Wan rotary embeddings entering each block (issue 16). The models cast their
    latents to their parameters' dtype themselves; everything else a block receives already comes
    out of bf16 layers."""
    return MixedPrecisionPolicy(param_dtype=param_dtype,
                                reduce_dtype=torch.float32 if param_dtype is not None else None,
                                cast_forward_inputs=False)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
    """fully_shard each block, then the root; bf16 params with fp32 gradient reduction on GPUs."""
    policy = mixed_precision_policy(param_dtype)
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def parallelize_video_dit(model: nn.Module, parallel: ParallelSection, world: World,
                          param_dtype: torch.dtype | None) -> nn.Module:
    if parallel.cp > 1:
        if parallel.dp_replicate > 1:
            raise ValueError("parallel.cp > 1 with parallel.dp_replicate > 1 is not supported yet")
        if world.world_size % parallel.cp:
            raise ValueError(f"parallel.cp={parallel.cp} does not divide the world size "
                             f"{world.world_size}")
        mesh = init_device_mesh(world.device.type, (world.world_size // parallel.cp, parallel.cp),
                                mesh_dim_names=("dp", "cp"))
        # the Wan policy's split points differ from the DiT's (parallel/wan_context_parallel.py)
        apply_cp = apply_wan_context_parallel if isinstance(model, WanPolicy) else apply_context_parallel
        apply_cp(model, mesh["cp"].get_group())
    if parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if parallel.compile_blocks:
        apply_compile(model)
    apply_fsdp(model, data_parallel_mesh(world, parallel.dp_replicate), param_dtype)
    logger.info("FSDP2 over %d ranks (replicate %d, context parallel %d), activation "
                "checkpointing %s, compile %s", world.world_size, parallel.dp_replicate, parallel.cp,
                parallel.activation_checkpointing, parallel.compile_blocks)
    return model
