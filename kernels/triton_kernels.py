"""The `triton` backend: Triton kernels for the loss ops and their launchers.

Imported only when the backend is used (importing triton fixes whether its interpreter is on). On CUDA
tensors these compile for the GPU; on CPU tensors they run only under TRITON_INTERPRET=1 (tests).

Layout: inputs are contiguous (B, N); the grid is (blocks of BLOCK elements along N, B). Forward
kernels write one partial sum per program into a (B, blocks) buffer that torch sums afterwards, so the
result does not depend on scheduling (no atomics). Backward kernels write each gradient element once.
Arithmetic is fp32 (fp64 when an input is fp64) whatever the storage dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One configuration on purpose: autotuning needs a GPU driver, and the interpreter runs ~1 ms per
# program whatever the block, so large blocks keep CPU tests fast. 4096 elements = 16 per thread at 8 warps.
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _offsets(n_per_sample, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    sample = tl.program_id(1)
    columns = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return block, sample, sample.to(tl.int64) * n_per_sample + columns, columns < n_per_sample


@triton.jit
def _flow_matching_sq_sum_kernel(v_ptr, x0_ptr, noise_ptr, partial_ptr, n_per_sample, blocks_per_sample,
                                 BLOCK: tl.constexpr, FP64: tl.constexpr):
    block, sample, index, mask = _offsets(n_per_sample, BLOCK)
    acc = tl.float64 if FP64 else tl.float32
    v = tl.load(v_ptr + index, mask=mask, other=0.0).to(acc)
    x0 = tl.load(x0_ptr + index, mask=mask, other=0.0).to(acc)
    noise = tl.load(noise_ptr + index, mask=mask, other=0.0).to(acc)
    residual = v - (noise - x0)
    tl.store(partial_ptr + sample * blocks_per_sample + block, tl.sum(residual * residual, axis=0))


@triton.jit
def _flow_matching_grad_kernel(grad_sum_ptr, v_ptr, x0_ptr, noise_ptr, out_ptr, n_per_sample,
                               BLOCK: tl.constexpr, FP64: tl.constexpr):
    _, sample, index, mask = _offsets(n_per_sample, BLOCK)
    acc = tl.float64 if FP64 else tl.float32
    scale = 2.0 * tl.load(grad_sum_ptr + sample).to(acc)
    v = tl.load(v_ptr + index, mask=mask, other=0.0).to(acc)
    x0 = tl.load(x0_ptr + index, mask=mask, other=0.0).to(acc)
    noise = tl.load(noise_ptr + index, mask=mask, other=0.0).to(acc)
    grad = scale * (v - (noise - x0))
    tl.store(out_ptr + index, grad.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sde_sq_sum_kernel(v_ptr, x_ptr, prev_ptr, coef_x_ptr, coef_v_ptr, partial_ptr, mean_ptr, n_per_sample,
                       blocks_per_sample, BLOCK: tl.constexpr, FP64: tl.constexpr, WRITE_MEAN: tl.constexpr):
    block, sample, index, mask = _offsets(n_per_sample, BLOCK)
    acc = tl.float64 if FP64 else tl.float32
    coef_x = tl.load(coef_x_ptr + sample).to(acc)
    coef_v = tl.load(coef_v_ptr + sample).to(acc)
    v = tl.load(v_ptr + index, mask=mask, other=0.0).to(acc)
    x = tl.load(x_ptr + index, mask=mask, other=0.0).to(acc)
    prev = tl.load(prev_ptr + index, mask=mask, other=0.0).to(acc)
    mean = x * coef_x + v * coef_v
    if WRITE_MEAN:
        tl.store(mean_ptr + index, mean.to(mean_ptr.dtype.element_ty), mask=mask)
    # masked lanes load zeros, so their residual is 0 - 0 = 0 and adds nothing
    residual = prev - mean
    tl.store(partial_ptr + sample * blocks_per_sample + block, tl.sum(residual * residual, axis=0))


@triton.jit
def _sde_grad_kernel(grad_sum_ptr, grad_mean_ptr, v_ptr, x_ptr, prev_ptr, coef_x_ptr, coef_v_ptr, out_ptr,
                     n_per_sample, BLOCK: tl.constexpr, FP64: tl.constexpr, HAS_GRAD_MEAN: tl.constexpr):
    _, sample, index, mask = _offsets(n_per_sample, BLOCK)
    acc = tl.float64 if FP64 else tl.float32
    coef_x = tl.load(coef_x_ptr + sample).to(acc)
    coef_v = tl.load(coef_v_ptr + sample).to(acc)
    scale = -2.0 * coef_v * tl.load(grad_sum_ptr + sample).to(acc)
    v = tl.load(v_ptr + index, mask=mask, other=0.0).to(acc)
    x = tl.load(x_ptr + index, mask=mask, other=0.0).to(acc)
    prev = tl.load(prev_ptr + index, mask=mask, other=0.0).to(acc)
    grad = scale * (prev - (x * coef_x + v * coef_v))
    if HAS_GRAD_MEAN:
        grad += coef_v * tl.load(grad_mean_ptr + index, mask=mask, other=0.0).to(acc)
    tl.store(out_ptr + index, grad.to(out_ptr.dtype.element_ty), mask=mask)


def _grid(batch: int, n_per_sample: int) -> tuple[int, int]:
    return triton.cdiv(n_per_sample, BLOCK), batch


def flow_matching_sq_sum(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                         acc: torch.dtype) -> torch.Tensor:
    """(B,) sums of (v - (noise - x0))^2 over contiguous (B, N) inputs, in dtype `acc`."""
    batch, n_per_sample = v.shape
    grid = _grid(batch, n_per_sample)
    partial = torch.empty((batch, grid[0]), dtype=acc, device=v.device)
    _flow_matching_sq_sum_kernel[grid](v, x0, noise, partial, n_per_sample, grid[0], BLOCK=BLOCK,
                                       FP64=acc == torch.float64, num_warps=NUM_WARPS)
    return partial.sum(dim=1)


def flow_matching_grad(grad_sum: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                       out: torch.Tensor) -> None:
    """out = 2 grad_sum_b (v - (noise - x0)) over contiguous (B, N) tensors."""
    batch, n_per_sample = v.shape
    _flow_matching_grad_kernel[_grid(batch, n_per_sample)](
        grad_sum, v, x0, noise, out, n_per_sample, BLOCK=BLOCK, FP64=grad_sum.dtype == torch.float64,
        num_warps=NUM_WARPS)


def sde_sq_sum(v: torch.Tensor, x: torch.Tensor, prev: torch.Tensor, coef_x: torch.Tensor,
               coef_v: torch.Tensor, mean_out: torch.Tensor | None) -> torch.Tensor:
    """(B,) sums of (prev - coef_x x - coef_v v)^2; the mean is written to mean_out when given."""
    batch, n_per_sample = v.shape
    grid = _grid(batch, n_per_sample)
    partial = torch.empty((batch, grid[0]), dtype=coef_x.dtype, device=v.device)
    _sde_sq_sum_kernel[grid](v, x, prev, coef_x, coef_v, partial, partial if mean_out is None else mean_out,
                             n_per_sample, grid[0], BLOCK=BLOCK, FP64=coef_x.dtype == torch.float64,
                             WRITE_MEAN=mean_out is not None, num_warps=NUM_WARPS)
    return partial.sum(dim=1)


def sde_grad(grad_sum: torch.Tensor, grad_mean: torch.Tensor | None, v: torch.Tensor, x: torch.Tensor,
             prev: torch.Tensor, coef_x: torch.Tensor, coef_v: torch.Tensor, out: torch.Tensor) -> None:
    """out = -2 coef_v grad_sum (prev - mean) [+ coef_v grad_mean] over contiguous (B, N) tensors."""
    batch, n_per_sample = v.shape
    _sde_grad_kernel[_grid(batch, n_per_sample)](
        grad_sum, out if grad_mean is None else grad_mean, v, x, prev, coef_x, coef_v, out, n_per_sample,
        BLOCK=BLOCK, FP64=coef_x.dtype == torch.float64, HAS_GRAD_MEAN=grad_mean is not None,
        num_warps=NUM_WARPS)
