"""VAE interface between pixels (decoded videos the rewards score) and latents (what the DiT denoises).

The demo's VAE is the identity up to an affine map, pixels [0, 1] <-> latents [-1, 1]; video VAEs
(for example a diffusers AutoencoderKLWan) plug in behind the same two calls.
"""

from __future__ import annotations

import torch


class PixelVAE:
    """Identity "VAE": latents (B, C, T, H, W) = 2 * pixels - 1; decode clamps to [0, 1]."""

    latent_channels = 3

    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        """videos float (B, 3, T, H, W) in [0, 1] -> latents in [-1, 1]."""
        return videos * 2.0 - 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, 3, T, H, W) -> videos float32 in [0, 1]."""
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)
