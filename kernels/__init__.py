"""Fused kernels for the DDRL losses, imported as `ddrl_scale.kernels` (setup.py maps `kernels/` there).

The per-element work of the policy loss + data loss stage (docs/architecture.md): the flow-matching
data loss and the SDE-step log-probability over every trained step, on video latents of millions of
elements per sample. Each op reads its inputs once in the forward and once in the backward, which
writes the gradient once. Layers, from the bottom:

- references: ddrl_scale.algo.losses.flow_matching_loss, ddrl_scale.algo.samplers.sde_step (imported);
- kernels: compiled.py (torch.compile of a fused formulation), triton_kernels.py (Triton), csrc/
  (CUDA C++, built on demand by cuda_extension.py);
- operators: ops.py, `torch.ops.ddrl.*` registered with torch.library.custom_op + fake + autograd;
  sharding.py lets DTensor inputs sharded along the batch through;
- public functions: losses.py, with `backend` = auto | torch | compile | triton | cuda resolved by
  dispatch.resolve_backend (auto: Triton on CUDA tensors, the compiled path on CPU; logged once).
"""

from ddrl_scale.kernels import sharding as _sharding  # noqa: F401  (registers DTensor rules)
from ddrl_scale.kernels.dispatch import BACKENDS, BackendUnavailableError, resolve_backend
from ddrl_scale.kernels.losses import flow_matching_loss, sde_log_prob, sde_transition_coefficients

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "flow_matching_loss",
    "resolve_backend",
    "sde_log_prob",
    "sde_transition_coefficients",
]
