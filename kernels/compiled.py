"""The `compile` backend: fused formulations of the loss kernels, compiled by torch.compile (inductor).

Each function below is one loop nest after compilation: the forward reads every input once and
reduces per sample; the backward reads every input once and writes the gradient once, into a buffer
given by the caller (so that on CPU it can be backed by huge pages, see memory.py). Inputs are
(B, N) views; per-sample factors are (B, 1). Arithmetic is in fp32 (fp64 when an input is fp64),
whatever the storage dtype, like the torch references in ddrl_scale.algo.

Compiled with dynamic shapes so that the rollout batch, the data batch and later changes of video
size reuse one graph per dtype combination instead of recompiling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the dtype of the references' arithmetic."""
    return torch.float64 if any(tensor.dtype == torch.float64 for tensor in tensors) else torch.float32


def _flow_matching_residual(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(v, x0, noise)
    return v.to(acc) - (noise.to(acc) - x0.to(acc))


def flow_matching_sq_sum(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(B,) sum over N of (v - (noise - x0))^2."""
    residual = _flow_matching_residual(v, x0, noise)
    return (residual * residual).sum(dim=1)


def flow_matching_grad(grad_sum: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                       out: torch.Tensor) -> None:
    """out = 2 grad_sum_b (v - (noise - x0)): the gradient of the sums above w.r.t. v."""
    residual = _flow_matching_residual(v, x0, noise)
    out.copy_((2.0 * grad_sum.to(residual.dtype)) * residual)


def _sde_mean(v: torch.Tensor, x: torch.Tensor, coef_x: torch.Tensor, coef_v: torch.Tensor) -> torch.Tensor:
    acc = coef_x.dtype
    return x.to(acc) * coef_x + v.to(acc) * coef_v


def sde_sq_sum(v: torch.Tensor, x: torch.Tensor, prev: torch.Tensor, coef_x: torch.Tensor,
               coef_v: torch.Tensor) -> torch.Tensor:
    """(B,) sum over N of (prev - mean)^2 with mean = coef_x x + coef_v v."""
    residual = prev.to(coef_x.dtype) - _sde_mean(v, x, coef_x, coef_v)
    return (residual * residual).sum(dim=1)


def sde_sq_sum_and_mean(v: torch.Tensor, x: torch.Tensor, prev: torch.Tensor, coef_x: torch.Tensor,
                        coef_v: torch.Tensor, mean_out: torch.Tensor) -> torch.Tensor:
    """sde_sq_sum, also writing the transition mean into mean_out in the same pass."""
    mean = _sde_mean(v, x, coef_x, coef_v)
    mean_out.copy_(mean)
    residual = prev.to(coef_x.dtype) - mean
    return (residual * residual).sum(dim=1)


def sde_grad(grad_sum: torch.Tensor, v: torch.Tensor, x: torch.Tensor, prev: torch.Tensor,
             coef_x: torch.Tensor, coef_v: torch.Tensor, out: torch.Tensor) -> None:
    """out = -2 coef_v grad_sum (prev - mean): the gradient of sde_sq_sum w.r.t. v."""
    residual = prev.to(coef_x.dtype) - _sde_mean(v, x, coef_x, coef_v)
    out.copy_((-2.0 * coef_v * grad_sum.to(coef_v.dtype)) * residual)


def sde_grad_with_mean(grad_sum: torch.Tensor, grad_mean: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
                       prev: torch.Tensor, coef_x: torch.Tensor, coef_v: torch.Tensor,
                       out: torch.Tensor) -> None:
    """sde_grad plus coef_v grad_mean, the gradient through the returned mean (a KL term)."""
    residual = prev.to(coef_x.dtype) - _sde_mean(v, x, coef_x, coef_v)
    out.copy_((-2.0 * coef_v * grad_sum.to(coef_v.dtype)) * residual + coef_v * grad_mean.to(coef_v.dtype))


_FUNCTIONS: dict[str, Callable[..., torch.Tensor | None]] = {
    function.__name__: function
    for function in (flow_matching_sq_sum, flow_matching_grad, sde_sq_sum, sde_sq_sum_and_mean, sde_grad,
                     sde_grad_with_mean)
}


@functools.cache
def compiled(name: str) -> Callable[..., torch.Tensor | None]:
    """The torch.compile'd version of one of the functions above (compiled on first call)."""
    return torch.compile(_FUNCTIONS[name], fullgraph=True, dynamic=True)
