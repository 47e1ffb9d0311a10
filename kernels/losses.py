"""Public fused DDRL losses: the same values as the references in ddrl_scale.algo, in one pass each way.

The policy loss + data loss stage of docs/architecture.md: `flow_matching_loss` is the data term of
`ddrl_scale.algo.losses.flow_matching_loss`, `sde_log_prob` the log-probability (and mean) of
`ddrl_scale.algo.samplers.sde_step` with prev_sample given, as the trainer recomputes it over every
trained step. backend="torch" calls those references; the other backends run the operators of ops.py.
"""

from __future__ import annotations

import math

import torch
from ddrl_scale.kernels import ops  # noqa: F401  (defines torch.ops.ddrl.*)
from ddrl_scale.kernels.compiled import accumulation_dtype
from ddrl_scale.kernels.dispatch import resolve_backend

from ddrl_scale.algo import losses as reference_losses
from ddrl_scale.algo import samplers as reference_samplers
from ddrl_scale.runtime import upcast

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)  # the Gaussian density's normaliser


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str) -> str:
    # a constant for torch.compile: resolved (and logged) once while tracing, not traced into
    return resolve_backend(backend, device_type)


def _replicated_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` as a replicated DTensor on like's mesh when like is a DTensor, else unchanged.

    No communication: every rank computed the same values from the same sigmas.
    """
    if not torch.distributed.is_available():
        return tensor
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(like, DTensor):
        return tensor
    placements = [Replicate()] * like.device_mesh.ndim
    return DTensor.from_local(tensor, like.device_mesh, placements, run_check=False)


def _check_batched(op: str, **tensors: torch.Tensor) -> None:
    """Same-shape floating (B, ...) tensors on one device; errors name the argument."""
    first_name, first = next(iter(tensors.items()))
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.dim() == 0:
            raise ValueError(f"{op}: {name} must be batched (B, ...), got a 0-d tensor")
        if tensor.shape != first.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}, expected {tuple(first.shape)} "
                             f"(the shape of {first_name})")
        if tensor.device != first.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}, expected {first.device} like {first_name}")


def _check_no_grad(op: str, differentiated: str, **tensors: torch.Tensor) -> None:
    if not torch.is_grad_enabled():
        return
    for name, tensor in tensors.items():
        if tensor.requires_grad:
            raise ValueError(f"{op}: {name} requires grad, but the fused kernels differentiate w.r.t. "
                             f"{differentiated} only; detach it or use backend='torch'")


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                       weight: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Per-sample flow-matching loss (B,): weight * mean over non-batch dims of (v_pred - (noise - x0))^2.

    v_pred, x0, noise: (B, ...) of one shape, any floating dtypes (mixed allowed, e.g. a bf16 model
    output against fp32 data); weight: (B,) or None. Result in fp32 (fp64 if an input is fp64).
    Differentiable w.r.t. v_pred (and weight); x0 and noise must not require grad.
    """
    _check_batched("flow_matching_loss", v_pred=v_pred, x0=x0, noise=noise)
    chosen = _resolve(backend, v_pred.device.type)
    if chosen == "torch" or v_pred.numel() == 0:
        return reference_losses.flow_matching_loss(v_pred, x0, noise, weight)
    _check_no_grad("flow_matching_loss", "v_pred", x0=x0, noise=noise)
    elements_per_sample = math.prod(v_pred.shape[1:])  # shape, not v_pred[0]: no slicing of a DTensor
    per_sample = torch.ops.ddrl.flow_matching_sq_sum(v_pred, x0, noise, chosen) / elements_per_sample
    return per_sample if weight is None else upcast(weight) * per_sample


def sde_transition_coefficients(sigma: float | torch.Tensor, sigma_next: float | torch.Tensor,
                                noise_level: float, batch: int, dtype: torch.dtype = torch.float32,
                                device: torch.device | str = "cpu"
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coef_x, coef_v, std), each (B,): sde_step's mean is coef_x x + coef_v v, its std is std.

    Read off the reference itself on a (B, 2) probe, x = (1, 0) and v = (0, 1), so the schedule
    formulas (Flow-GRPO's std_t, the first step's denominator) live only in ddrl_scale.algo.samplers.
    """
    probe_x = torch.tensor([1.0, 0.0], dtype=dtype, device=device).expand(batch, 2)
    probe_v = torch.tensor([0.0, 1.0], dtype=dtype, device=device).expand(batch, 2)
    _, _, mean, std = reference_samplers.sde_step(probe_v, probe_x, sigma, sigma_next, noise_level,
                                                  prev_sample=probe_x)
    return mean[:, 0], mean[:, 1], std


def sde_log_prob(v: torch.Tensor, x: torch.Tensor, prev_sample: torch.Tensor, sigma: float | torch.Tensor,
                 sigma_next: float | torch.Tensor, noise_level: float, *, backend: str = "auto",
                 return_mean: bool = False, return_std: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Log-probability (B,) of prev_sample under the SDE step from x with velocity v, as sde_step's [1].

    v, x, prev_sample: (B, ...) of one shape, any floating dtypes; sigma, sigma_next: floats or (B,)
    tensors. Arithmetic in fp32 (fp64 if an input is fp64). Returns log_prob, then the transition mean
    (B, ...) if return_mean (sde_step's [2]), then std (B,) if return_std (sde_step's [3]).
    Differentiable w.r.t. v through log_prob and mean; prev_sample is treated as data (detached, like
    the reference); x must not require grad.
    """
    _check_batched("sde_log_prob", v=v, x=x, prev_sample=prev_sample)
    chosen = _resolve(backend, v.device.type)
    if chosen == "torch" or v.numel() == 0:
        _, log_prob, mean, std = reference_samplers.sde_step(v, x, sigma, sigma_next, noise_level,
                                                             prev_sample=prev_sample)
    else:
        _check_no_grad("sde_log_prob", "v", x=x)
        acc = accumulation_dtype(v, x, prev_sample)
        coef_x, coef_v, std = sde_transition_coefficients(sigma, sigma_next, noise_level, v.shape[0], acc,
                                                          v.device)
        coef_x, coef_v, std = (_replicated_like(vector, v) for vector in (coef_x, coef_v, std))
        sums, mean = torch.ops.ddrl.sde_sq_sum(v, x, prev_sample.detach(), coef_x, coef_v, return_mean,
                                               chosen)
        elements_per_sample = math.prod(v.shape[1:])
        log_prob = -sums / (2.0 * elements_per_sample * std**2) - torch.log(std) - _LOG_SQRT_2PI
    outputs = (log_prob, *((mean,) if return_mean else ()), *((std,) if return_std else ()))
    return outputs[0] if len(outputs) == 1 else outputs
