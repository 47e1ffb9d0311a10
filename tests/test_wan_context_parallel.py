"""Context parallel (parallel.cp=2) for the diffusers Wan policy, on CPU with gloo, against the plain
single-process policy with the same weights and inputs:

- forward: the output of each of the 2 CP ranks equals the unsharded output;
- gradients: every rank backpropagates the same loss of the gathered output; the average of the
  ranks' parameter gradients (what the data-parallel reduction over dp x cp ranks computes) equals
  the unsharded gradient, both with the hooks alone and through parallelize_video_dit (FSDP2);
- training (slow, ~50 s): `ddrl demo` (the train command on the embedded defaults) with fsdp2 +
  cp=2 on 2 ranks logs the per-step losses and ends with the weights of the same run in one process;
- a head or token count that cp does not divide is a ConfigError naming parallel.cp.

Tolerances are fp32 reduction-order ones: the sharded run adds the same terms in another order.
"""

from __future__ import annotations

import copy
import multiprocessing
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="needs diffusers (pip install diffusers==0.42.1)")

import test_wan_adapter as wan_tests  # noqa: E402
from test_distributed import _assert_metrics_close, _metrics  # noqa: E402

from ddrl_scale.config import ConfigError, load_config  # noqa: E402
from ddrl_scale.config.schema import ParallelSection  # noqa: E402
from ddrl_scale.models import build_model  # noqa: E402
from ddrl_scale.parallel.distributed import World  # noqa: E402
from ddrl_scale.parallel.parallelize import parallelize_video_dit  # noqa: E402
from ddrl_scale.parallel.wan_context_parallel import apply_wan_context_parallel  # noqa: E402
from ddrl_scale.train.anchor_data import demo_shards  # noqa: E402
from ddrl_scale.train.checkpoint import latest_checkpoint, read_weights  # noqa: E402

wan_folder = wan_tests.wan_folder  # the tiny random Wan2.1-shaped transformer in diffusers format

OUT_RTOL, OUT_ATOL = 1e-5, 1e-6  # forward output
# parameter gradients: a sum over 128 tokens' terms, up to ~40 here, so the absolute tolerance is
# relative to each tensor's largest reference gradient (1e-5 of it: ~100 fp32 ulps of that element)
GRAD_RTOL, GRAD_ATOL_OF_MAX = 1e-5, 1e-5
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-5  # weights after training (as test_wan_adapter's fsdp2 test)


@pytest.fixture(scope="module")
def policy(wan_folder, tmp_path_factory, shared_shards_dir):
    """The tiny policy (64 video tokens, 2 heads) built as a run builds it."""
    run_dir = tmp_path_factory.mktemp("wan_cp")
    return build_model(load_config(None, wan_tests._wan_overrides(wan_folder, run_dir, shared_shards_dir)))


def _output_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output on known inputs and the gradients of a weighted sum of it (every output element its
    own weight, so a token routed to the wrong place changes the gradient)."""
    latents, sigma, text = wan_tests._known_input()
    output = model(latents, sigma, text)
    weight = torch.randn(output.shape, generator=torch.Generator().manual_seed(2))
    (output * weight).sum().backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return output.detach(), grads


def _rank(rank: int, policy, store: str, out: Path) -> None:
    """One of 2 CP ranks: the hooks alone (gradients averaged by hand), then parallelize_video_dit
    (FSDP2 over both ranks, cp=2: FSDP2's reduction averages)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        hooked = copy.deepcopy(policy)
        apply_wan_context_parallel(hooked, dist.group.WORLD)
        output, grads = _output_and_grads(hooked)
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= 2
        sharded = parallelize_video_dit(copy.deepcopy(policy), ParallelSection(engine="fsdp2", cp=2),
                                        World(rank=rank, world_size=2), None)
        fsdp_output, fsdp_grads = _output_and_grads(sharded)
        torch.save({"hooks": (output, grads), "fsdp2": (fsdp_output, fsdp_grads)}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ranks(policy, tmp_path: Path) -> list[dict]:
    context = multiprocessing.get_context("fork")  # the children inherit the policy and imports
    processes = [context.Process(target=_rank, args=(rank, policy, str(tmp_path / "store"), tmp_path))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        if process.exitcode is None:
            for other in processes:
                other.kill()
            pytest.fail("a CP rank did not finish in 120 s")
        assert process.exitcode == 0, f"a CP rank failed (exit {process.exitcode})"
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def test_cp2_forward_and_gradients_match_the_unsharded_policy(policy, tmp_path):
    want_output, want_grads = _output_and_grads(copy.deepcopy(policy))
    assert all(grad.abs().max() > 0 for grad in want_grads.values())  # every gradient is checked
    results = _run_ranks(policy, tmp_path)
    for rank, result in enumerate(results):
        for path, (output, grads) in result.items():
            what = f"rank {rank}, {path}"
            torch.testing.assert_close(output, want_output, rtol=OUT_RTOL, atol=OUT_ATOL, msg=what)
            assert grads.keys() == want_grads.keys()
            worst_grad = worst_ratio = 0.0
            for name, grad in grads.items():
                want = want_grads[name]
                scale = want.abs().max().item()
                torch.testing.assert_close(grad, want, rtol=GRAD_RTOL, atol=GRAD_ATOL_OF_MAX * scale,
                                           msg=lambda m, n=name, w=what: f"{w}, {n}: {m}")
                difference = (grad - want).abs().max().item()
                worst_grad, worst_ratio = max(worst_grad, difference), max(worst_ratio, difference / scale)
            worst_output = (output - want_output).abs().max().item()
            print(f"{what}: max |output difference| {worst_output:.3g}, max |gradient difference| "
                  f"{worst_grad:.3g} (at most {worst_ratio:.3g} of the tensor's largest gradient)")


def test_indivisible_heads_or_tokens_name_parallel_cp(wan_folder, tmp_path, shared_shards_dir):
    base = [*wan_tests._wan_overrides(wan_folder, tmp_path, shared_shards_dir), "parallel.engine=fsdp2"]
    with pytest.raises(ConfigError, match=r"parallel.cp.*num_attention_heads=2.*model.pretrained"):
        build_model(load_config(None, [*base, "parallel.cp=3"]))
    # 3 x 6 x 6 latents in (1, 2, 2) patches: 27 tokens
    with pytest.raises(ConfigError, match=r"parallel.cp.*27 video tokens.*video.num_frames"):
        build_model(load_config(None, [*base, "parallel.cp=2", "video.num_frames=3", "video.height=6",
                                       "video.width=6"]))


@pytest.mark.slow
def test_cp2_training_matches_one_process(wan_folder, tmp_path, shared_shards_dir):
    """2 DDRL steps: fsdp2 + cp=2 on 2 ranks == engine none in one process (per-step losses within
    test_distributed's REL / ABS, weights within WEIGHT_RTOL / WEIGHT_ATOL)."""
    base = [*wan_tests._wan_overrides(wan_folder, tmp_path, shared_shards_dir), "optim.lr=3e-4"]
    demo_shards(load_config(None, base))  # written once, before two ranks could race for them
    runs = {"one": tmp_path / "one", "cp2": tmp_path / "cp2"}
    wan_tests._demo([*base, f"run.output_dir={runs['one']}"], 1, tmp_path / "one.log")
    # with activation checkpointing: its recompute re-runs the hooks' collectives in the backward
    cp2 = ["parallel.engine=fsdp2", "parallel.cp=2", "parallel.activation_checkpointing=true"]
    wan_tests._demo([*base, *cp2, f"run.output_dir={runs['cp2']}"], 2, tmp_path / "cp2.log")
    got, want = _metrics(runs["cp2"]), _metrics(runs["one"])
    assert sorted(got) == sorted(want) == [1, 2]
    _assert_metrics_close(got, want, [1, 2], "wan fsdp2 + cp2 vs one process")
    for ema in (False, True):
        got_weights, want_weights = (read_weights(latest_checkpoint(runs[name]), ema=ema)
                                     for name in ("cp2", "one"))
        assert got_weights.keys() == want_weights.keys()
        torch.testing.assert_close(got_weights, want_weights, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
        worst = max((got_weights[n] - want_weights[n]).abs().max().item() for n in got_weights)
        print(f"wan fsdp2 + cp2 vs one process: max |weight difference| (ema={ema}) = {worst:.3g}")
