"""Fused DDRL loss kernels (ddrl_scale.kernels) against the torch references of ddrl_scale.algo.

Triton runs here through its interpreter: TRITON_INTERPRET=1 is set below, before anything imports
triton, on machines without CUDA (tests/test_kernels_gpu.py runs the GPU paths). The compiled path
runs through inductor's C++ backend. Tolerances, the same seed for fused and reference:
- fp32 inputs: outputs and gradients rtol 1e-5, atol 1e-6 (same fp32 arithmetic, other summation order);
- bf16 inputs: outputs (fp32) rtol 1e-5, atol 1e-6; bf16 gradients rtol 2**-7 (one bf16 rounding
  step: both sides compute in fp32 and round once), atol 1e-6;
- fp64 inputs: rtol 1e-12, atol 1e-12.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ddrl_scale import kernels  # noqa: E402  (after TRITON_INTERPRET)
from ddrl_scale.algo.losses import flow_matching_loss as reference_flow_matching_loss  # noqa: E402
from ddrl_scale.algo.samplers import sde_step  # noqa: E402

compiled, dispatch, memory = kernels.compiled, kernels.dispatch, kernels.memory

SHAPE = (3, 16, 5, 9, 13)  # odd on purpose: no dimension is a multiple of a block or vector width
CSRC = Path(kernels.__file__).resolve().parent / "csrc"
TOLERANCES = {  # dtype -> (output tolerances, gradient tolerances)
    torch.float32: ({"rtol": 1e-5, "atol": 1e-6}, {"rtol": 1e-5, "atol": 1e-6}),
    torch.bfloat16: ({"rtol": 1e-5, "atol": 1e-6}, {"rtol": 2**-7, "atol": 1e-6}),
    torch.float64: ({"rtol": 1e-12, "atol": 1e-12}, {"rtol": 1e-12, "atol": 1e-12}),
}


def triton_or_skip() -> None:
    problem = dispatch.triton_problem("cpu")
    if problem is not None:
        pytest.skip(f"Triton interpreter unavailable: {problem}")


def backend_or_skip(backend: str) -> str:
    if backend == "triton":
        triton_or_skip()
    elif dispatch.compile_problem("cpu") is not None:
        pytest.skip(f"torch.compile unavailable: {dispatch.compile_problem('cpu')}")
    return backend


def randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerances: dict) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **tolerances)


def sde_inputs(v_dtype: torch.dtype, data_dtype: torch.dtype, sigma, sigma_next, shape=SHAPE):
    """v, x and a prev_sample drawn from the reference transition (so log-probs are realistic)."""
    v = randn(shape, v_dtype, 1).requires_grad_()
    x = randn(shape, data_dtype, 2)
    prev, _, _, _ = sde_step(v.detach(), x, sigma, sigma_next, 0.7, noise=randn(shape, torch.float32, 3))
    return v, x, prev.to(data_dtype)


def check_flow_matching(backend: str, v_dtype: torch.dtype, data_dtype: torch.dtype, weighted: bool,
                        shape=SHAPE) -> None:
    v = randn(shape, v_dtype, 1).requires_grad_()
    x0, noise = randn(shape, data_dtype, 2), randn(shape, data_dtype, 3)
    weight = None
    if weighted:
        weight = torch.rand(shape[0], generator=torch.Generator().manual_seed(4)).requires_grad_()
    upstream = randn((shape[0],), torch.float32, 5)
    expected = reference_flow_matching_loss(v, x0, noise, weight)
    actual = kernels.flow_matching_loss(v, x0, noise, weight, backend=backend)
    inputs = (v, weight) if weighted else (v,)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    actual_grads = torch.autograd.grad(actual, inputs, upstream)
    output_tolerance, grad_tolerance = TOLERANCES[v_dtype]
    assert_close(actual, expected, output_tolerance)
    assert_close(actual_grads[0], expected_grads[0], grad_tolerance)
    if weighted:
        assert_close(actual_grads[1], expected_grads[1], output_tolerance)


def check_sde(backend: str, v_dtype: torch.dtype, data_dtype: torch.dtype, sigma, sigma_next,
              return_mean: bool, shape=SHAPE) -> None:
    v, x, prev = sde_inputs(v_dtype, data_dtype, sigma, sigma_next, shape)
    _, expected_log_prob, expected_mean, expected_std = sde_step(v, x, sigma, sigma_next, 0.7,
                                                                 prev_sample=prev)
    outputs = kernels.sde_log_prob(v, x, prev, sigma, sigma_next, 0.7, backend=backend,
                                   return_mean=return_mean, return_std=True)
    log_prob, mean, std = outputs if return_mean else (outputs[0], None, outputs[1])
    output_tolerance, grad_tolerance = TOLERANCES[v_dtype]
    assert_close(log_prob, expected_log_prob, output_tolerance)
    assert_close(std, expected_std, output_tolerance)
    upstream = randn((shape[0],), torch.float32, 6)
    if return_mean:
        assert_close(mean, expected_mean, output_tolerance)
        mean_upstream = randn(shape, expected_mean.dtype, 7)
        actual_grad, = torch.autograd.grad((log_prob, mean), v, (upstream, mean_upstream))
        expected_grad, = torch.autograd.grad((expected_log_prob, expected_mean), v, (upstream, mean_upstream))
    else:
        actual_grad, = torch.autograd.grad(log_prob, v, upstream)
        expected_grad, = torch.autograd.grad(expected_log_prob, v, upstream)
    assert_close(actual_grad, expected_grad, grad_tolerance)


# -- parity with the references ---------------------------------------------------------------------------

# bf16 through inductor compiles graphs of its own (~5 s each on 2 cores): slow; Triton covers bf16 by default
BACKEND_DTYPES = [("compile", torch.float32), pytest.param("compile", torch.bfloat16, marks=pytest.mark.slow),
                  ("triton", torch.float32), ("triton", torch.bfloat16)]
DTYPE_IDS = ["compile-fp32", "compile-bf16", "triton-fp32", "triton-bf16"]


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES, ids=DTYPE_IDS)
def test_flow_matching_matches_reference(backend, dtype):
    check_flow_matching(backend_or_skip(backend), dtype, dtype, weighted=True)


@pytest.mark.parametrize("backend", ["triton", pytest.param("compile", marks=pytest.mark.slow)])
def test_flow_matching_bf16_output_on_fp32_data(backend):
    """The trainer's case: a bf16 model output against fp32 latents and noise."""
    check_flow_matching(backend_or_skip(backend), torch.bfloat16, torch.float32, weighted=False)


# first step (sigma = 1 uses sigma_next in std's denominator) as floats; later steps as (B,) tensors
FIRST_STEP = (1.0, 0.9)
PER_SAMPLE_STEPS = (torch.tensor([0.8, 0.5, 0.3]), torch.tensor([0.7, 0.4, 0.2]))


@pytest.mark.parametrize("return_mean", [False, True], ids=["log_prob", "log_prob+mean"])
@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES, ids=DTYPE_IDS)
def test_sde_log_prob_matches_reference(backend, dtype, return_mean):
    sigmas = PER_SAMPLE_STEPS if return_mean else FIRST_STEP
    check_sde(backend_or_skip(backend), dtype, dtype, *sigmas, return_mean=return_mean)


@pytest.mark.parametrize("backend", ["triton", pytest.param("compile", marks=pytest.mark.slow)])
def test_sde_log_prob_bf16_velocity_on_fp32_states(backend):
    check_sde(backend_or_skip(backend), torch.bfloat16, torch.float32, *PER_SAMPLE_STEPS, return_mean=True)


@pytest.mark.parametrize("backend", ["triton", pytest.param("compile", marks=pytest.mark.slow)])
def test_float64_inputs_accumulate_in_float64(backend):
    backend_or_skip(backend)
    check_flow_matching(backend, torch.float64, torch.float64, weighted=True, shape=(3, 7, 11))
    check_sde(backend, torch.float64, torch.float64, *PER_SAMPLE_STEPS, return_mean=True, shape=(3, 7, 11))


def test_triton_odd_layouts_match_reference():
    """Non-contiguous inputs, batch 1 and (B,) inputs (one element per sample)."""
    triton_or_skip()
    v = randn((3, 5, 3), torch.float32, 1).transpose(1, 2).requires_grad_()  # (3, 3, 5), strided
    x0, noise = randn((3, 5, 3), torch.float32, 2).transpose(1, 2), randn((3, 3, 5), torch.float32, 3)
    assert not v.is_contiguous() and not x0.is_contiguous()
    expected = reference_flow_matching_loss(v, x0, noise)
    actual = kernels.flow_matching_loss(v, x0, noise, backend="triton")
    assert_close(actual, expected, TOLERANCES[torch.float32][0])
    grad, = torch.autograd.grad(actual.sum(), v)
    expected_grad, = torch.autograd.grad(expected.sum(), v)
    assert_close(grad, expected_grad, TOLERANCES[torch.float32][1])
    check_flow_matching("triton", torch.float32, torch.float32, weighted=True, shape=(1, 4, 9))
    check_flow_matching("triton", torch.float32, torch.float32, weighted=False, shape=(6,))
    check_sde("triton", torch.float32, torch.float32, 0.5, 0.25, return_mean=True, shape=(1, 4, 9))
    # (B,) inputs are left out for sde_step: its mean over dims=() reduces the batch too (a scalar)


def test_torch_backend_is_the_reference():
    v, x, prev = sde_inputs(torch.float32, torch.float32, *PER_SAMPLE_STEPS)
    assert torch.equal(kernels.flow_matching_loss(v, x, prev, backend="torch"),
                       reference_flow_matching_loss(v, x, prev))
    log_prob, mean = kernels.sde_log_prob(v, x, prev, *PER_SAMPLE_STEPS, 0.7, backend="torch",
                                          return_mean=True)
    _, expected_log_prob, expected_mean, _ = sde_step(v, x, *PER_SAMPLE_STEPS, 0.7, prev_sample=prev)
    assert torch.equal(log_prob, expected_log_prob) and torch.equal(mean, expected_mean)


def test_transition_coefficients_reproduce_the_reference_mean():
    """coef_x x + coef_v v is sde_step's mean; std is its std, for the first step and later ones."""
    for sigma, sigma_next in (FIRST_STEP, PER_SAMPLE_STEPS):
        x, v = randn((3, 8), torch.float32, 1), randn((3, 8), torch.float32, 2)
        coef_x, coef_v, std = kernels.sde_transition_coefficients(sigma, sigma_next, 0.7, 3)
        _, _, mean, expected_std = sde_step(v, x, sigma, sigma_next, 0.7, prev_sample=x)
        torch.testing.assert_close(coef_x[:, None] * x + coef_v[:, None] * v, mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(std, expected_std, rtol=0, atol=0)


# -- operators: registration, torch.compile, DTensor --------------------------------------------------------

def test_operators_pass_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of every ddrl operator."""
    triton_or_skip()
    batch, shape = 3, (3, 4, 5)
    v, x, prev = randn(shape, torch.float32, 1).requires_grad_(), randn(shape, torch.float32, 2), randn(
        shape, torch.float32, 3)
    coef_x, coef_v, grad = torch.rand(batch), torch.rand(batch), torch.rand(batch)
    cases = [
        (torch.ops.ddrl.flow_matching_sq_sum, (v, x, prev, "triton")),
        (torch.ops.ddrl.flow_matching_sq_sum_backward, (grad, v.detach(), x, prev, "triton")),
        (torch.ops.ddrl.sde_sq_sum, (v, x, prev, coef_x, coef_v, True, "triton")),
        (torch.ops.ddrl.sde_sq_sum, (v, x, prev, coef_x, coef_v, False, "triton")),
        (torch.ops.ddrl.sde_sq_sum_backward, (grad, torch.randn(shape), v.detach(), x, prev, coef_x, coef_v,
                                              "triton")),
        (torch.ops.ddrl.sde_sq_sum_backward, (grad, None, v.detach(), x, prev, coef_x, coef_v, "triton")),
    ]
    for operator, args in cases:
        results = torch.library.opcheck(operator, args)
        assert all(value == "SUCCESS" for value in results.values()), (operator, results)


@pytest.mark.slow
def test_compiled_functions_are_one_fused_loop_each():
    """Inductor turns every function of compiled.py into a single C++ kernel that writes its output
    buffer in place: the fused path reads each input once per pass."""
    from torch._inductor.utils import run_and_get_code

    backend_or_skip("compile")
    batch, n = 3, 1000
    v, x, prev, grad_mean = (randn((batch, n), torch.float32, seed) for seed in range(4))
    coef_x, coef_v, grad = torch.rand(batch, 1), torch.rand(batch, 1), torch.rand(batch, 1)
    calls = {
        "flow_matching_sq_sum": (v, x, prev),
        "flow_matching_grad": (grad, v, x, prev, torch.empty(batch, n)),
        "sde_sq_sum": (v, x, prev, coef_x, coef_v),
        "sde_sq_sum_and_mean": (v, x, prev, coef_x, coef_v, torch.empty(batch, n)),
        "sde_grad": (grad, v, x, prev, coef_x, coef_v, torch.empty(batch, n)),
        "sde_grad_with_mean": (grad, grad_mean, v, x, prev, coef_x, coef_v, torch.empty(batch, n)),
    }
    for name, args in calls.items():
        torch._dynamo.reset()  # a fresh compilation, so that its code is captured
        _, codes = run_and_get_code(torch.compile(compiled._FUNCTIONS[name], dynamic=True, fullgraph=True),
                                    *args)
        code = "\n".join(codes)
        assert code.count("cpp_pybinding(") == 1, f"{name}: expected one fused kernel\n{code}"
        allocations = re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code)
        assert all(len([size for size in sizes.split(",") if size.strip()]) == 1 for sizes in allocations), (
            f"{name}: allocates a full-size intermediate: {allocations}")
    torch._dynamo.reset()


def test_fullgraph_compile_over_the_ops():
    """A torch.compile(fullgraph=True) region calling both public losses: ops are graph nodes, values
    and gradients equal eager."""
    triton_or_skip()
    shape = (2, 3, 4, 5)

    def losses(v, x0, noise, prev):
        data = kernels.flow_matching_loss(v, x0, noise, backend="triton")
        log_prob, mean = kernels.sde_log_prob(v, x0, prev, 0.6, 0.5, 0.7, backend="triton", return_mean=True)
        return data.mean() - log_prob.mean() + mean.square().mean()

    v = randn(shape, torch.float32, 1).requires_grad_()
    x0, noise, prev = (randn(shape, torch.float32, seed) for seed in (2, 3, 4))
    torch._dynamo.reset()
    compiled_loss = torch.compile(losses, fullgraph=True, backend="aot_eager")(v, x0, noise, prev)
    eager_loss = losses(v, x0, noise, prev)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(loss, v)[0] for loss in (compiled_loss, eager_loss)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.slow
def test_fullgraph_inductor_compile_over_the_compiled_backend():
    """The same with inductor around the ops and the compiled backend inside them."""
    backend_or_skip("compile")
    shape = (2, 3, 4, 5)

    def loss(v, x0, noise):
        per_sample = kernels.flow_matching_loss(v, x0, noise, torch.tensor([0.5, 2.0]), backend="compile")
        return (per_sample * 3.0).sum()

    v = randn(shape, torch.float32, 1).requires_grad_()
    x0, noise = randn(shape, torch.float32, 2), randn(shape, torch.float32, 3)
    torch._dynamo.reset()
    compiled_loss = torch.compile(loss, fullgraph=True)(v, x0, noise)
    expected = (reference_flow_matching_loss(v, x0, noise, torch.tensor([0.5, 2.0])) * 3.0).sum()
    torch.testing.assert_close(compiled_loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(compiled_loss, v)[0], torch.autograd.grad(expected, v)[0])
    torch._dynamo.reset()


def test_dtensor_inputs_sharded_on_the_batch():
    """A one-rank gloo mesh: batch-sharded and replicated DTensors go through the ops and match plain
    tensors (the sharding rules of sharding.py); a channel-sharded input is redistributed first."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    triton_or_skip()
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        v, x, prev = sde_inputs(torch.float32, torch.float32, *PER_SAMPLE_STEPS, shape=(3, 4, 5))
        expected_data = reference_flow_matching_loss(v, x, prev)
        _, expected_log_prob, expected_mean, _ = sde_step(v, x, *PER_SAMPLE_STEPS, 0.7, prev_sample=prev)
        expected_grad, = torch.autograd.grad(expected_data.sum() + expected_log_prob.sum()
                                             + expected_mean.sum(), v)
        for placement in (Shard(0), Replicate(), Shard(1)):
            dv = distribute_tensor(v.detach(), mesh, [placement]).requires_grad_()
            dx, dprev = (distribute_tensor(t, mesh, [placement]) for t in (x, prev))
            data = kernels.flow_matching_loss(dv, dx, dprev, backend="triton")
            log_prob, mean = kernels.sde_log_prob(dv, dx, dprev, *PER_SAMPLE_STEPS, 0.7, backend="triton",
                                                  return_mean=True)
            assert isinstance(data, DTensor) and isinstance(log_prob, DTensor)
            if placement == Shard(0):
                assert data.placements == (Shard(0),) and log_prob.placements == (Shard(0),)
            torch.testing.assert_close(data.full_tensor(), expected_data)
            torch.testing.assert_close(log_prob.full_tensor(), expected_log_prob)
            torch.testing.assert_close(mean.full_tensor(), expected_mean)
            grad, = torch.autograd.grad(data.sum() + log_prob.sum() + mean.sum(), dv)
            torch.testing.assert_close(grad.full_tensor(), expected_grad)
    finally:
        dist.destroy_process_group()


TWO_RANK_WORKER = """
import sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from ddrl_scale import kernels
from ddrl_scale.algo.losses import flow_matching_loss
from ddrl_scale.algo.samplers import sde_step

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
generator = torch.Generator().manual_seed(0)
v, x, prev = (torch.randn(4, 3, 5, generator=generator) for _ in range(3))
sigma, sigma_next = torch.tensor([1.0, 0.8, 0.6, 0.4]), torch.tensor([0.9, 0.7, 0.5, 0.3])
dv = distribute_tensor(v, mesh, [Shard(0)]).requires_grad_()
dx, dprev = (distribute_tensor(t, mesh, [Shard(0)]) for t in (x, prev))
data = kernels.flow_matching_loss(dv, dx, dprev, backend="triton")
log_prob, mean = kernels.sde_log_prob(dv, dx, dprev, sigma, sigma_next, 0.7, backend="triton",
                                      return_mean=True)
assert data.placements == (Shard(0),) and log_prob.placements == (Shard(0),)
assert data.to_local().shape == (2,) and mean.to_local().shape == (2, 3, 5)
grad, = torch.autograd.grad(data.sum() + log_prob.sum() + mean.sum(), dv)
v.requires_grad_()
_, ref_log_prob, ref_mean, _ = sde_step(v, x, sigma, sigma_next, 0.7, prev_sample=prev)
ref_data = flow_matching_loss(v, x, prev)
ref_grad, = torch.autograd.grad(ref_data.sum() + ref_log_prob.sum() + ref_mean.sum(), v)
torch.testing.assert_close(data.full_tensor(), ref_data)
torch.testing.assert_close(log_prob.full_tensor(), ref_log_prob)
torch.testing.assert_close(grad.full_tensor(), ref_grad)
sys.stdout.write(f"rank {dist.get_rank()} ok\\n")  # one write: the two ranks' lines never interleave
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_dtensor_two_ranks_batch_sharded(tmp_path):
    """Two gloo ranks under torchrun, inputs sharded on the batch: each rank computes its own samples
    (local shapes are half the batch) and the gathered results equal the single-process reference."""
    triton_or_skip()
    script = tmp_path / "worker.py"
    script.write_text(TWO_RANK_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(re.findall(r"rank \d ok", done.stdout)) == ["rank 0 ok", "rank 1 ok"], done.stdout


# -- dispatch and input checks ------------------------------------------------------------------------------

@pytest.fixture
def fresh_resolutions():
    dispatch.forget_resolutions()
    yield
    dispatch.forget_resolutions()


def test_resolve_backend_choices_and_errors(fresh_resolutions, monkeypatch, caplog):
    with pytest.raises(ValueError, match="auto, torch, compile, triton, cuda.*'fast'"):
        kernels.resolve_backend("fast", "cpu")
    with pytest.raises(kernels.BackendUnavailableError, match="'cuda' cannot run on cpu tensors.*CUDA"):
        kernels.resolve_backend("cuda", "cpu")
    assert kernels.resolve_backend("torch", "cpu") == "torch"
    if dispatch.compile_problem("cpu") is None:
        with caplog.at_level(logging.INFO, logger=dispatch.__name__):
            assert kernels.resolve_backend("auto", torch.device("cpu")) == "compile"
            assert kernels.resolve_backend("auto", "cpu") == "compile"
            # the ops are called with the resolved name: no second line for it
            assert kernels.resolve_backend("compile", "cpu") == "compile"
        messages = [record.getMessage() for record in caplog.records]
        assert messages.count("fused loss kernels: backend 'auto' on cpu tensors -> compile") == 1
        assert sum(message.startswith("fused loss kernels") for message in messages) == 1
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(kernels.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        kernels.resolve_backend("triton", "cpu")


def test_auto_falls_back_to_the_reference_without_a_compiler(fresh_resolutions, monkeypatch):
    monkeypatch.setattr(dispatch, "compile_problem", lambda device_type: "no C++ compiler (test)")
    assert kernels.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(kernels.BackendUnavailableError, match="no C\\+\\+ compiler"):
        kernels.resolve_backend("compile", "cpu")


def test_cuda_extension_reports_why_it_cannot_build():
    from ddrl_scale.kernels import cuda_extension

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: tests/test_kernels_gpu.py builds the extension")
    assert "CUDA" in cuda_extension.load_problem()
    with pytest.raises(RuntimeError, match="CUDA"):
        cuda_extension.extension()


def test_bad_inputs_name_the_argument():
    v, x0, noise = (randn(shape, torch.float32, seed) for seed, shape in enumerate([(2, 3), (2, 3), (2, 4)]))
    with pytest.raises(ValueError, match=r"noise has shape \(2, 4\), expected \(2, 3\)"):
        kernels.flow_matching_loss(v, x0, noise, backend="torch")
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor, got torch.int64"):
        kernels.flow_matching_loss(v, x0.long(), noise[:, :3], backend="torch")
    with pytest.raises(ValueError, match="v_pred must be batched"):
        kernels.flow_matching_loss(v[0, 0], x0[0, 0], noise[0, 0], backend="torch")
    with pytest.raises(ValueError, match="x0 requires grad"):
        kernels.flow_matching_loss(v, x0.requires_grad_(), noise[:, :3], backend="compile")
    with pytest.raises(ValueError, match="x requires grad"):
        kernels.sde_log_prob(v, x0, noise[:, :3], 0.5, 0.4, 0.7, backend="compile")
    with pytest.raises(TypeError, match="prev_sample must be a torch.Tensor"):
        kernels.sde_log_prob(v, x0, None, 0.5, 0.4, 0.7, backend="torch")


def test_huge_page_outputs_are_plain_tensors():
    out = memory.empty_output((3, 1 << 20), torch.float32, torch.device("cpu"))
    out.copy_(torch.arange(3.0)[:, None].expand(3, 1 << 20))
    assert out.is_contiguous() and out.sum().item() == (1 << 20) * 3.0
    assert not memory.advise_huge_pages(torch.empty(100))  # smaller than two huge pages: left alone


# -- CUDA sources, compiled without a GPU -------------------------------------------------------------------

CUDA_HOMES = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]


def nvcc_or_skip() -> str:
    candidates = [shutil.which("nvcc"), *(os.path.join(home, "bin", "nvcc") for home in CUDA_HOMES if home)]
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("nvcc not found (PATH or $CUDA_HOME/bin): needs the CUDA toolkit to compile csrc/*.cu")


def cuda_include_or_skip() -> Path:
    for home in CUDA_HOMES:
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home) / "include"
    pytest.skip("cuda_runtime.h not under $CUDA_HOME or /usr/local/cuda: needs the CUDA toolkit headers")


@pytest.mark.slow
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    nvcc = nvcc_or_skip()
    command = [nvcc, "-c", "-O3", "-std=c++17", "-Werror", "all-warnings",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               str(CSRC / "diffusion_losses.cu"), "-o", str(tmp_path / "diffusion_losses.o")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "diffusion_losses.o").stat().st_size > 0


@pytest.mark.slow
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """bindings.cpp against this torch's headers and the CUDA runtime headers (syntax and types only:
    a CPU torch cannot link CUDA). The CPU wheel lacks one generated c10/cuda header; an empty one
    stands in for it."""
    from torch.utils.cpp_extension import include_paths

    cuda_include = cuda_include_or_skip()
    compiler = shutil.which(os.environ.get("CXX", "g++")) or pytest.skip("no C++ compiler ($CXX or g++)")
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    includes = [*include_paths(), sysconfig.get_paths()["include"], str(tmp_path), str(cuda_include)]
    command = [compiler, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror",
               "-DTORCH_EXTENSION_NAME=ddrl_test", *(f"-I{path}" for path in includes),
               str(CSRC / "bindings.cpp")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_benchmark_harness_runs_on_a_small_shape(tmp_path):
    """benchmarks/bench_kernels.py end to end on a tiny shape, eager and triton, without writing results."""
    triton_or_skip()
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    command = [sys.executable, str(script), "--shape", "2,3,4,5", "--backends", "torch,triton",
               "--ops", "flow_matching,sde_log_prob_mean", "--dtypes", "fp32", "--reps", "1", "--warmup", "1",
               "--no-write"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| sde_log_prob_mean | fp32 | both | triton |" in done.stdout
    assert "memory bandwidth: read" in done.stdout
