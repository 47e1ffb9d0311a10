"""The fused loss kernels as torch operators: `torch.ops.ddrl.*` with fake and autograd registrations.

The operators do only the per-element work, on tensors of millions of elements: sums over each sample
of a squared residual (forward) and the gradient of those sums w.r.t. v (backward). The per-sample
arithmetic around them ((B,) tensors: weights, 1/N, the Gaussian normaliser) stays in plain torch in
losses.py, where autograd handles it. Registered with torch.library.custom_op, so torch.compile
treats each call as one opaque node (fake implementations give it shapes), autograd calls the
backward operator, and DTensor inputs sharded along the batch dimension work (sharding.py).

Every operator takes the backend name that runs it (compile, triton or cuda; resolved beforehand by
dispatch.resolve_backend). Big inputs are (B, ...) of any floating dtype, read as (B, N) rows
(non-contiguous ones are copied first); per-sample vectors are (B,) in the accumulation dtype.
"""

from __future__ import annotations

from types import ModuleType

import torch
from ddrl_scale.kernels import compiled, cuda_extension
from ddrl_scale.kernels.compiled import accumulation_dtype
from ddrl_scale.kernels.memory import empty_output

Tensor = torch.Tensor
KERNEL_BACKENDS = ("compile", "triton", "cuda")


def _triton() -> ModuleType:
    # imported on first use: importing triton decides once whether its interpreter is on
    from ddrl_scale.kernels import triton_kernels

    return triton_kernels


def _rows(tensor: Tensor) -> Tensor:
    """(B, ...) -> contiguous (B, N): a view for contiguous tensors."""
    return tensor.reshape(tensor.shape[0], -1).contiguous()


def _per_sample(vector: Tensor, dtype: torch.dtype) -> Tensor:
    """A (B,) vector as contiguous `dtype` (upstream gradients of a sum arrive as stride-0 expands)."""
    return vector.to(dtype).contiguous()


def _unknown(backend: str) -> ValueError:
    return ValueError(f"ddrl kernels: backend {backend!r} has no kernel; expected one of {KERNEL_BACKENDS}")


# -- flow-matching loss: sum_i (v - (noise - x0))_i^2 per sample ---------------------------------------

@torch.library.custom_op("ddrl::flow_matching_sq_sum", mutates_args=())
def flow_matching_sq_sum(v: Tensor, x0: Tensor, noise: Tensor, backend: str) -> Tensor:
    """(B,) sums over each sample of (v - (noise - x0))^2, in fp32 (fp64 if an input is fp64)."""
    v_rows, x0_rows, noise_rows = _rows(v), _rows(x0), _rows(noise)
    if backend == "compile":
        return compiled.compiled("flow_matching_sq_sum")(v_rows, x0_rows, noise_rows)
    if backend == "triton":
        return _triton().flow_matching_sq_sum(v_rows, x0_rows, noise_rows, accumulation_dtype(v, x0, noise))
    if backend == "cuda":
        return cuda_extension.flow_matching_sq_sum(v_rows, x0_rows, noise_rows)
    raise _unknown(backend)


@flow_matching_sq_sum.register_fake
def _(v: Tensor, x0: Tensor, noise: Tensor, backend: str) -> Tensor:
    return v.new_empty((v.shape[0],), dtype=accumulation_dtype(v, x0, noise))


@torch.library.custom_op("ddrl::flow_matching_sq_sum_backward", mutates_args=())
def flow_matching_sq_sum_backward(grad_sum: Tensor, v: Tensor, x0: Tensor, noise: Tensor,
                                  backend: str) -> Tensor:
    """grad_sum (B,) -> the gradient w.r.t. v of flow_matching_sq_sum: 2 grad_sum_b (v - (noise - x0))."""
    v_rows, x0_rows, noise_rows = _rows(v), _rows(x0), _rows(noise)
    grad_sum = _per_sample(grad_sum, accumulation_dtype(v, x0, noise))
    if backend == "cuda":
        return cuda_extension.flow_matching_grad(grad_sum, v_rows, x0_rows, noise_rows).view(v.shape)
    out = empty_output(v.shape, v.dtype, v.device)
    if backend == "compile":
        compiled.compiled("flow_matching_grad")(grad_sum.unsqueeze(1), v_rows, x0_rows, noise_rows,
                                                out.view(v_rows.shape))
    elif backend == "triton":
        _triton().flow_matching_grad(grad_sum, v_rows, x0_rows, noise_rows, out.view(v_rows.shape))
    else:
        raise _unknown(backend)
    return out


@flow_matching_sq_sum_backward.register_fake
def _(grad_sum: Tensor, v: Tensor, x0: Tensor, noise: Tensor, backend: str) -> Tensor:
    return torch.empty_like(v, memory_format=torch.contiguous_format)


def _flow_matching_setup(ctx, inputs: tuple, output: Tensor) -> None:
    v, x0, noise, backend = inputs
    ctx.save_for_backward(v, x0, noise)
    ctx.backend = backend


def _flow_matching_backward(ctx, grad_sum: Tensor) -> tuple[Tensor | None, ...]:
    v, x0, noise = ctx.saved_tensors
    grad_v = None
    if ctx.needs_input_grad[0]:
        grad_v = torch.ops.ddrl.flow_matching_sq_sum_backward(grad_sum, v, x0, noise, ctx.backend)
    # x0 and noise are data: the public function refuses them when they require grad
    return grad_v, None, None, None


flow_matching_sq_sum.register_autograd(_flow_matching_backward, setup_context=_flow_matching_setup)


# -- SDE step: sum_i (prev - mean)_i^2 per sample, mean = coef_x x + coef_v v ------------------------------

@torch.library.custom_op("ddrl::sde_sq_sum", mutates_args=())
def sde_sq_sum(v: Tensor, x: Tensor, prev: Tensor, coef_x: Tensor, coef_v: Tensor, return_mean: bool,
               backend: str) -> tuple[Tensor, Tensor]:
    """(B,) sums of (prev - mean)^2 and the mean (shape of x; an empty tensor unless return_mean).

    coef_x, coef_v: (B,) in the accumulation dtype (fp32, fp64 if an input is fp64), which is also
    the dtype of both outputs.
    """
    acc = accumulation_dtype(v, x, prev)
    v_rows, x_rows, prev_rows = _rows(v), _rows(x), _rows(prev)
    coef_x, coef_v = _per_sample(coef_x, acc), _per_sample(coef_v, acc)
    if backend == "cuda":
        sums, mean = cuda_extension.sde_sq_sum(v_rows, x_rows, prev_rows, coef_x, coef_v, return_mean)
        return sums, mean.view(x.shape) if return_mean else mean
    mean = empty_output(x.shape, acc, x.device) if return_mean else x.new_empty((0,), dtype=acc)
    mean_rows = mean.view(x_rows.shape) if return_mean else None
    if backend == "compile":
        if return_mean:
            sums = compiled.compiled("sde_sq_sum_and_mean")(v_rows, x_rows, prev_rows, coef_x.unsqueeze(1),
                                                            coef_v.unsqueeze(1), mean_rows)
        else:
            sums = compiled.compiled("sde_sq_sum")(v_rows, x_rows, prev_rows, coef_x.unsqueeze(1),
                                                   coef_v.unsqueeze(1))
    elif backend == "triton":
        sums = _triton().sde_sq_sum(v_rows, x_rows, prev_rows, coef_x, coef_v, mean_rows)
    else:
        raise _unknown(backend)
    return sums, mean


@sde_sq_sum.register_fake
def _(v: Tensor, x: Tensor, prev: Tensor, coef_x: Tensor, coef_v: Tensor, return_mean: bool,
      backend: str) -> tuple[Tensor, Tensor]:
    acc = accumulation_dtype(v, x, prev)
    mean = x.new_empty(x.shape, dtype=acc) if return_mean else x.new_empty((0,), dtype=acc)
    return v.new_empty((v.shape[0],), dtype=acc), mean


@torch.library.custom_op("ddrl::sde_sq_sum_backward", mutates_args=())
def sde_sq_sum_backward(grad_sum: Tensor, grad_mean: Tensor | None, v: Tensor, x: Tensor, prev: Tensor,
                        coef_x: Tensor, coef_v: Tensor, backend: str) -> Tensor:
    """Gradient w.r.t. v: -2 coef_v grad_sum (prev - mean) [+ coef_v grad_mean]."""
    acc = accumulation_dtype(v, x, prev)
    v_rows, x_rows, prev_rows = _rows(v), _rows(x), _rows(prev)
    coef_x, coef_v, grad_sum = _per_sample(coef_x, acc), _per_sample(coef_v, acc), _per_sample(grad_sum, acc)
    grad_mean_rows = None if grad_mean is None else _rows(grad_mean)
    if backend == "cuda":
        return cuda_extension.sde_grad(grad_sum, grad_mean_rows, v_rows, x_rows, prev_rows, coef_x,
                                       coef_v).view(v.shape)
    out = empty_output(v.shape, v.dtype, v.device)
    if backend == "compile":
        per_sample = (coef_x.unsqueeze(1), coef_v.unsqueeze(1))
        if grad_mean_rows is None:
            compiled.compiled("sde_grad")(grad_sum.unsqueeze(1), v_rows, x_rows, prev_rows, *per_sample,
                                          out.view(v_rows.shape))
        else:
            compiled.compiled("sde_grad_with_mean")(grad_sum.unsqueeze(1), grad_mean_rows, v_rows, x_rows,
                                                    prev_rows, *per_sample, out.view(v_rows.shape))
    elif backend == "triton":
        _triton().sde_grad(grad_sum, grad_mean_rows, v_rows, x_rows, prev_rows, coef_x, coef_v,
                           out.view(v_rows.shape))
    else:
        raise _unknown(backend)
    return out


@sde_sq_sum_backward.register_fake
def _(grad_sum: Tensor, grad_mean: Tensor | None, v: Tensor, x: Tensor, prev: Tensor, coef_x: Tensor,
      coef_v: Tensor, backend: str) -> Tensor:
    return torch.empty_like(v, memory_format=torch.contiguous_format)


def _sde_setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    v, x, prev, coef_x, coef_v, return_mean, backend = inputs
    ctx.save_for_backward(v, x, prev, coef_x, coef_v)
    ctx.return_mean = return_mean
    ctx.backend = backend


def _sde_backward(ctx, grad_sum: Tensor | None, grad_mean: Tensor | None) -> tuple[Tensor | None, ...]:
    v, x, prev, coef_x, coef_v = ctx.saved_tensors
    grad_v = None
    if ctx.needs_input_grad[0]:
        if grad_sum is None:
            grad_sum = coef_x.new_zeros(coef_x.shape)
        if not ctx.return_mean:
            grad_mean = None  # the empty placeholder output
        grad_v = torch.ops.ddrl.sde_sq_sum_backward(grad_sum, grad_mean, v, x, prev, coef_x, coef_v,
                                                    ctx.backend)
    # x, prev and the coefficients carry no gradient (the public function refuses an x that needs one)
    return grad_v, None, None, None, None, None, None


sde_sq_sum.register_autograd(_sde_backward, setup_context=_sde_setup)
