"""DTensor sharding rules for the ops of ops.py: replicated, or sharded along the batch dimension.

Every op works sample by sample, so inputs sharded on dim 0 give outputs sharded on dim 0 with no
communication; any other placement (a sharded channel or frame dim) is first redistributed by DTensor
to one of these, because a per-sample sum over a sharded dim would need a reduction across ranks.
Registered on import of ddrl_scale.kernels where torch.distributed exists.
"""

from __future__ import annotations

import torch


def _register() -> None:
    if not torch.distributed.is_available():
        return
    # import for the side effect of defining torch.ops.ddrl.*
    from ddrl_scale.kernels import ops  # noqa: F401
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    ddrl = torch.ops.ddrl
    replicate, batch = Replicate(), Shard(0)

    def strategies(outputs: list, inputs: list) -> list:
        """Everything replicated, or the given placements (batch-sharded tensors) everywhere."""
        replicated = [None if placement is None else replicate for placement in inputs]
        return [([replicate] * len(outputs), replicated), (outputs, inputs)]

    @register_sharding(ddrl.flow_matching_sq_sum.default)
    def _(v, x0, noise, backend):
        return strategies([batch], [batch, batch, batch, None])

    @register_sharding(ddrl.flow_matching_sq_sum_backward.default)
    def _(grad_sum, v, x0, noise, backend):
        return strategies([batch], [batch, batch, batch, batch, None])

    @register_sharding(ddrl.sde_sq_sum.default)
    def _(v, x, prev, coef_x, coef_v, return_mean, backend):
        # without return_mean the mean output is an empty placeholder: it stays replicated
        return strategies([batch, batch if return_mean else replicate], [batch] * 5 + [None, None])

    @register_sharding(ddrl.sde_sq_sum_backward.default)
    def _(grad_sum, grad_mean, v, x, prev, coef_x, coef_v, backend):
        return strategies([batch], [batch, None if grad_mean is None else batch] + [batch] * 5 + [None])


_register()
