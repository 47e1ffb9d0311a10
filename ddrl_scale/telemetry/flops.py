"""Model FLOPs of one DDRL iteration and a measured matmul peak, the two halves of MFU.

MFU = model FLOPs per second / peak FLOPs per second. Model FLOPs count the matmuls of the DiT
(`models.dit.flops_per_sample`); recomputation (activation checkpointing) is not counted, as is the
convention. The peak is measured on the same machine with a large square matmul.
"""

from __future__ import annotations

import time

import torch

from ddrl_scale.algo.steps import step_plan
from ddrl_scale.config.schema import RunConfig
from ddrl_scale.models import dit_config_from, flops_per_sample


def ddrl_iteration_flops(config: RunConfig, model_config=None) -> dict[str, float]:
    """Global model FLOPs of one iteration, by phase: rollout, policy training, data term.

    model_config: the policy's `config` (a Wan adapter's, say); default: the config's DiT."""
    forward = flops_per_sample(model_config or dit_config_from(config), training=False)
    settings, steps = config.algo, config.sampler.num_steps
    samples = settings.prompts_per_step * settings.group_size
    plan = step_plan(settings, steps)
    trained = len(plan.steps)
    reference = trained * samples * forward if settings.kl_beta > 0 else 0.0
    return {
        # edm_ab2 predicts the clean sample with one forward more (the release's sample_clean)
        "rollout": samples * (steps + (config.sampler.kind == "edm_ab2")) * forward,
        "policy": trained * samples * 3.0 * forward + reference,
        "data": plan.data_forwards * plan.data_samples * 3.0 * forward,
    }


def measure_matmul_peak(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a size x size matmul on `device` (the MFU denominator)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available() and str(device).startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if torch.cuda.is_available() and str(device).startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
