"""Context parallel (Ulysses) over the video token sequence, applied to a plain VideoDiT from outside.

The ranks of a CP group work on the same samples and hold N / cp tokens each: a hook on the patch
embedding keeps this rank's slice of the tokens, each self-attention swaps (sequence-sharded, all
heads) for (full sequence, heads / cp) with an all-to-all, applies rotary and attention, and swaps
back; cross-attention, MLP and adaLN are per token and run on the local slice; a hook on the final
projection all-gathers the tokens, so the model's output is whole on every rank of the group.
(Ulysses: Jacobs et al. 2023, "DeepSpeed Ulysses", arXiv 2309.14509.)

Gradients: every rank of the group computes the same loss from the gathered output, and the
gather's backward hands each rank only its own tokens' gradient, so each rank's parameter
gradients are the part that flows through its tokens; their sum over the group is the whole
gradient. The data-parallel reduction averages over dp x cp ranks, so the gather's backward
multiplies by cp to turn that average over the group into the sum.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split x along scatter_dim over the group, concatenate the received pieces along gather_dim."""
    size = dist.get_world_size(group)
    inputs = [piece.contiguous() for piece in x.chunk(size, dim=scatter_dim)]
    outputs = [torch.empty_like(piece) for piece in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


class _GatherTokens(torch.autograd.Function):
    """All-gather along dim 1; backward keeps this rank's slice, times the group size (see above)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=1)

    @staticmethod
    def backward(ctx, grad):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=1)[rank] * size, None


def _local_tokens(x: torch.Tensor, group) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[1] % size:
        raise ValueError(f"context parallel: {x.shape[1]} video tokens do not split over "
                         f"parallel.cp={size} ranks")
    return x.chunk(size, dim=1)[rank]


def apply_context_parallel(model: nn.Module, group) -> None:
    """Shard the token sequence of `model` (a VideoDiT) over the ranks of `group`."""
    size = dist.get_world_size(group)
    num_heads = model.config.num_heads
    if num_heads % size:
        raise ValueError(f"context parallel: model.num_heads={num_heads} must be a multiple of "
                         f"parallel.cp={size} (Ulysses splits the heads)")
    model.patch_embed.register_forward_hook(lambda module, args, out: _local_tokens(out, group))
    model.final_proj.register_forward_hook(lambda module, args, out: _GatherTokens.apply(out, group))
    for block in model.blocks:
        attention = block.self_attn
        plain = attention.core_attention

        def core_attention(self, query, key, value, rope, plain=plain):
            # (B, heads, N/cp, d) -> (B, heads/cp, N, d): whole sequence, some heads
            query, key, value = (_AllToAll.apply(t, 1, 2, group) for t in (query, key, value))
            out = plain(query, key, value, rope)
            return _AllToAll.apply(out, 2, 1, group)

        attention.core_attention = types.MethodType(core_attention, attention)
