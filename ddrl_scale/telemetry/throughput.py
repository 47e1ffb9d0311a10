"""Per-step throughput figures for the metrics stream: samples/s, video tokens/s and MFU.

MFU = model FLOPs of the iteration (`telemetry.flops.ddrl_iteration_flops`: rollout, policy and
data terms, no recomputation) / step time / (peak FLOP/s per device x devices). The peak comes
from the data-sheet table (`telemetry.devices`) when the device is a known GPU, else from a
matmul probe on the device itself (CPUs, unknown GPUs), measured once per process.
"""

from __future__ import annotations

import functools
import logging

import torch

from ddrl_scale.config.schema import RunConfig
from ddrl_scale.models import dit_config_from
from ddrl_scale.telemetry.devices import spec_for_device_name
from ddrl_scale.telemetry.flops import ddrl_iteration_flops, measure_matmul_peak

logger = logging.getLogger(__name__)

RUN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def math_mode(dtype: torch.dtype) -> str:
    """The table key for matmuls in `dtype`: bf16 (fp16 has the same peak), tf32 when torch lets
    fp32 matmuls use TF32 tensor cores, else fp32."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype != torch.float32:
        raise ValueError(f"device_peak_flops: no peak for dtype {dtype}; expected float32, "
                         f"bfloat16 or float16")
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "fp32"


@functools.cache
def _probed_peak(device: str, dtype: torch.dtype) -> float:
    # a 2048^3 matmul is ~17 GFLOP: long enough on a GPU, ~0.1 s on two CPU cores (bf16)
    size = 4096 if device.startswith("cuda") else 2048
    return measure_matmul_peak(dtype, device, size=size)


def device_peak_flops(device: torch.device | str, dtype: torch.dtype) -> float:
    """Peak dense FLOP/s of one `device` for matmuls in `dtype`: the table for known GPUs, else a
    matmul probe on the device (measured once per process and device)."""
    device = torch.device(device)
    mode = math_mode(dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = spec_for_device_name(name)
        if spec is not None:
            logger.info("peak FLOP/s of %s (%s): %.1f TFLOP/s from the data-sheet table", name, mode,
                        spec.peak_flops[mode] / 1e12)
            return spec.peak_flops[mode]
        logger.info("no table entry for GPU '%s': measuring its %s matmul peak", name, mode)
    return _probed_peak(str(device), dtype)


def step_throughput(config: RunConfig, step_time_s: float, peak_flops: float,
                    num_devices: int = 1, model_config=None) -> dict[str, float]:
    """samples_per_s (rollout videos generated per second, all ranks), video_tokens_per_s (their
    latent tokens after patching) and mfu, for one iteration of `config` taking `step_time_s`.

    peak_flops: per device (device_peak_flops); num_devices: the devices the iteration ran on;
    model_config: the policy's `config` (default: the config's DiT).
    """
    if not step_time_s > 0:
        raise ValueError(f"step_throughput step_time_s: expected seconds > 0, got {step_time_s!r}")
    if not peak_flops > 0 or num_devices < 1:
        raise ValueError(f"step_throughput: expected peak_flops > 0 and num_devices >= 1, got "
                         f"{peak_flops!r} and {num_devices!r}")
    samples = config.algo.prompts_per_step * config.algo.group_size
    tokens = (model_config or dit_config_from(config)).num_tokens
    model_flops = sum(ddrl_iteration_flops(config, model_config).values())
    return {
        "samples_per_s": samples / step_time_s,
        "video_tokens_per_s": samples * tokens / step_time_s,
        "mfu": model_flops / step_time_s / (peak_flops * num_devices),
    }
