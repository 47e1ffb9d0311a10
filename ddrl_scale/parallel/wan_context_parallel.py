"""Context parallel (Ulysses) for the diffusers Wan policy (`model.kind=diffusers_wan`), applied
from outside by hooks, with the collectives and gradient semantics of context_parallel.py.

Where WanTransformer3DModel.forward is split and joined (the points of diffusers' own `_cp_plan`):
  blocks[0]      a pre-hook keeps this rank's N / cp of the patch tokens (B, N, D)
  attn1          hooks on norm_q, norm_k and to_v swap (B, N / cp, D) for (B, N, D / cp): the whole
                 sequence with heads / cp of the heads (the projections are laid out head by head,
                 so a slice of D is a group of heads); `heads` is set to heads / cp so that the
                 processor splits D / cp into whole heads; a pre-hook on to_out[0] swaps back
  rotary         stays whole: the processor applies it after the swap, on the whole sequence
  attn2, ffn     per token: run on the local slice (the text is whole on every rank)
  proj_out       a hook all-gathers the tokens before the unpatchify (_GatherTokens: its backward
                 keeps this rank's slice times cp, as the data-parallel average is over dp x cp)

The processor itself is diffusers' WanAttnProcessor, untouched: norm_q / norm_k normalise over all
heads of a token, so the swap must come after them, and the processor calls them as modules.
"""

from __future__ import annotations

import torch.distributed as dist

from ddrl_scale.config.schema import ConfigError
from ddrl_scale.parallel.context_parallel import _AllToAll, _GatherTokens, _local_tokens


def check_divisible(config, cp: int) -> None:
    """ConfigError naming parallel.cp unless cp divides the heads and the video tokens of `config`
    (a WanPolicyConfig): Ulysses gives each rank heads / cp heads and N / cp tokens."""
    if config.num_heads % cp:
        raise ConfigError(f"config key 'parallel.cp': {cp} must divide the transformer's "
                          f"num_attention_heads={config.num_heads} (model.pretrained="
                          f"'{config.pretrained}'; context parallel splits the heads)")
    if config.num_tokens % cp:
        raise ConfigError(f"config key 'parallel.cp': {cp} must divide the {config.num_tokens} video "
                          f"tokens (grid {config.grid} of video.num_frames/height/width over "
                          f"model.patch_size={list(config.patch_size)})")


def _shard_tokens(group):
    """Pre-hook of blocks[0]: keep this rank's slice of hidden_states (positional or keyword)."""
    def hook(module, args, kwargs):
        if args:
            return (_local_tokens(args[0], group), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _local_tokens(kwargs["hidden_states"], group)}
    return hook


def apply_wan_context_parallel(policy, group) -> None:
    """Shard the token sequence of `policy` (a WanPolicy) over the ranks of `group`."""
    size = dist.get_world_size(group)
    check_divisible(policy.config, size)
    transformer = policy.transformer
    transformer.blocks[0].register_forward_pre_hook(_shard_tokens(group), with_kwargs=True)
    transformer.proj_out.register_forward_hook(lambda module, args, out: _GatherTokens.apply(out, group))
    for block in transformer.blocks:
        attention = block.attn1
        if getattr(attention, "fused_projections", False):
            # the fused to_qkv bypasses the to_v hook; unfuse before parallelizing
            raise ValueError("context parallel: fused QKV projections are not supported with parallel.cp > 1")
        for module in (attention.norm_q, attention.norm_k, attention.to_v):
            # (B, N/cp, D) -> (B, N, D/cp): whole sequence, some heads
            module.register_forward_hook(lambda module, args, out: _AllToAll.apply(out, 2, 1, group))
        attention.to_out[0].register_forward_pre_hook(
            lambda module, args: (_AllToAll.apply(args[0], 1, 2, group), *args[1:]))
        attention.heads //= size
