"""Tensor parallel for a rollout rank's inference copy of the built-in VideoDiT (torch DTensor).

Applied from outside the plain model, over a 1-D mesh of the rollout ranks that serve one share of
prompts together: in every block the attention query / key / value and the first MLP layer are
column-parallel (each rank holds num_heads / tp heads and a slice of the MLP width), the attention
output and the second MLP layer row-parallel (their partial outputs are summed over the mesh), the
same split as the Megatron trainer engine. Norms, embeddings and adaLN stay whole on every rank.
Inference only: no gradients cross the mesh. Activations outside the parallel layers are plain
tensors, whole on every rank, so the sampler around the model is unchanged.

Published weights arrive whole (rollout/publish.py); `load_full` keeps this rank's shard of each.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ddrl_scale.config.schema import ConfigError
from ddrl_scale.models.dit import VideoDiT


def shard_inference_copy(model: nn.Module, mesh: DeviceMesh) -> None:
    """Split `model`'s (a VideoDiT) projections over `mesh`, in place; parameter names unchanged."""
    size = mesh.size()
    if not isinstance(model, VideoDiT):
        raise ConfigError("config key 'rollout.tp_size': tensor-parallel rollout copies are built for "
                          "model.kind=dit (the built-in VideoDiT); use rollout.tp_size=1")
    config = model.config
    if config.num_heads % size or config.mlp_hidden % size:
        raise ConfigError(f"config key 'rollout.tp_size': {size} must divide model.num_heads="
                          f"{config.num_heads} and the MLP width {config.mlp_hidden}")
    plan = {}
    for attention in ("self_attn", "cross_attn"):
        plan |= {f"{attention}.{name}": ColwiseParallel() for name in ("query", "key", "value")}
        plan[f"{attention}.out"] = RowwiseParallel()
    plan |= {"mlp.0": ColwiseParallel(), "mlp.2": RowwiseParallel()}
    for block in model.blocks:
        parallelize_module(block, mesh, plan)
        for attention in (block.self_attn, block.cross_attn):
            attention.num_heads = config.num_heads // size  # the heads this rank computes


@torch.no_grad()
def load_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole published tensor into `param`, keeping only this rank's shard of a DTensor."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the whole tensor already, so no scatter is needed
        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None)
    param.copy_(value)


def local_parameter_count(model: nn.Module) -> int:
    """Elements of the parameters this rank holds: its shards of the split ones, the others whole."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def full_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of every parameter; a DTensor's shards are gathered over its mesh (every
    rank of the mesh must call, in the same order)."""
    for name, param in model.named_parameters():
        yield name, param.full_tensor() if isinstance(param, DTensor) else param
