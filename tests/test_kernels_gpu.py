"""The fused DDRL loss kernels on a GPU: Triton, CUDA C++ and compiled paths against the references.

Skipped without CUDA (the CPU paths, and Triton through its interpreter, are in tests/test_kernels.py).
Shapes are odd, and large enough for many blocks per sample and for the CUDA kernels' grid-stride
loop (more than 1024 blocks x 256 threads x 4 elements per sample). Tolerances as in test_kernels.py
(fp16 like bf16 with its own rounding step, 2**-10).
"""

from __future__ import annotations

import pytest
import torch

from ddrl_scale import kernels
from ddrl_scale.algo.losses import flow_matching_loss as reference_flow_matching_loss
from ddrl_scale.algo.samplers import sde_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: runs the Triton and CUDA C++ kernels on it")

DEVICE = "cuda"
SHAPES = [(3, 16, 5, 9, 13), (2, 1_100_003)]  # odd; the second crosses the CUDA grid-stride loop
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}
GPU_BACKENDS = ["triton", "cuda", "compile"]


def backend_or_skip(backend: str) -> str:
    try:
        kernels.resolve_backend(backend, DEVICE)
    except kernels.BackendUnavailableError as error:
        pytest.skip(str(error))
    return backend


def randn(shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=DEVICE).to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 1e-6) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", SHAPES, ids=["video", "long"])
@pytest.mark.parametrize(("v_dtype", "data_dtype"), [(torch.float32, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16),
                                                     (torch.float16, torch.float16),
                                                     (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "fp16", "bf16-on-fp32"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_flow_matching_matches_reference(backend, v_dtype, data_dtype, shape):
    backend_or_skip(backend)
    v = randn(shape, v_dtype, 1).requires_grad_()
    x0, noise = randn(shape, data_dtype, 2), randn(shape, data_dtype, 3)
    weight = torch.rand(shape[0], device=DEVICE)
    upstream = randn((shape[0],), torch.float32, 4)
    expected = reference_flow_matching_loss(v, x0, noise, weight)
    actual = kernels.flow_matching_loss(v, x0, noise, weight, backend=backend)
    assert_close(actual, expected, rtol=1e-5)
    expected_grad, = torch.autograd.grad(expected, v, upstream)
    actual_grad, = torch.autograd.grad(actual, v, upstream)
    assert_close(actual_grad, expected_grad, rtol=GRAD_RTOL[v_dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=["video", "long"])
@pytest.mark.parametrize("return_mean", [False, True], ids=["log_prob", "log_prob+mean"])
@pytest.mark.parametrize(("v_dtype", "data_dtype"), [(torch.float32, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16),
                                                     (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "bf16-on-fp32"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sde_log_prob_matches_reference(backend, v_dtype, data_dtype, return_mean, shape):
    backend_or_skip(backend)
    batch = shape[0]
    sigma = torch.linspace(1.0, 0.4, batch, device=DEVICE)  # sample 0 takes the first-step branch
    sigma_next = sigma - 0.1
    v = randn(shape, v_dtype, 1).requires_grad_()
    x = randn(shape, data_dtype, 2)
    prev, _, _, _ = sde_step(v.detach(), x, sigma, sigma_next, 0.7, noise=randn(shape, torch.float32, 3))
    prev = prev.to(data_dtype)
    _, expected_log_prob, expected_mean, _ = sde_step(v, x, sigma, sigma_next, 0.7, prev_sample=prev)
    outputs = kernels.sde_log_prob(v, x, prev, sigma, sigma_next, 0.7, backend=backend,
                                   return_mean=return_mean)
    log_prob, mean = outputs if return_mean else (outputs, None)
    assert_close(log_prob, expected_log_prob, rtol=1e-5)
    upstream = randn((batch,), torch.float32, 4)
    if return_mean:
        assert_close(mean, expected_mean, rtol=1e-5)
        mean_upstream = randn(shape, torch.float32, 5)
        actual_grad, = torch.autograd.grad((log_prob, mean), v, (upstream, mean_upstream))
        expected_grad, = torch.autograd.grad((expected_log_prob, expected_mean), v, (upstream, mean_upstream))
    else:
        actual_grad, = torch.autograd.grad(log_prob, v, upstream)
        expected_grad, = torch.autograd.grad(expected_log_prob, v, upstream)
    assert_close(actual_grad, expected_grad, rtol=GRAD_RTOL[v_dtype])


def test_auto_picks_triton_on_cuda_tensors():
    kernels.dispatch.forget_resolutions()
    expected = "triton" if kernels.dispatch.triton_problem("cuda") is None else "torch"
    assert kernels.resolve_backend("auto", DEVICE) == expected


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fullgraph_inductor_compile_over_the_gpu_ops(backend):
    backend_or_skip(backend)
    shape = (2, 4, 3, 17, 19)

    def loss(v, x0, noise, prev):
        data = kernels.flow_matching_loss(v, x0, noise, backend=backend)
        log_prob, mean = kernels.sde_log_prob(v, x0, prev, 0.6, 0.5, 0.7, backend=backend, return_mean=True)
        return data.mean() - log_prob.mean() + mean.square().mean()

    v = randn(shape, torch.bfloat16, 1).requires_grad_()
    x0, noise, prev = (randn(shape, torch.float32, seed) for seed in (2, 3, 4))
    torch._dynamo.reset()
    compiled_loss = torch.compile(loss, fullgraph=True)(v, x0, noise, prev)
    eager_loss = loss(v, x0, noise, prev)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(value, v)[0] for value in (compiled_loss, eager_loss)]
    torch.testing.assert_close(grads[0], grads[1], rtol=2**-7, atol=1e-6)
    torch._dynamo.reset()


def test_cuda_backend_refuses_float64_by_name():
    backend_or_skip("cuda")
    v, x0, noise = (randn((2, 8), torch.float64, seed) for seed in range(3))
    with pytest.raises(TypeError, match="v is torch.float64"):
        kernels.flow_matching_loss(v, x0, noise, backend="cuda")
