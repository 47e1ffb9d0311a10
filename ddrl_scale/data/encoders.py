"""The encoders `ddrl data prepare` runs: pixels -> latents (a VAE) and captions -> embeddings.

Place in the data flow (docs/architecture.md): between decoding (`video_io.py`) and the latent
shards (`latent_shards.py`). Every VAE has the interface of `models/vae.py`: `encode(videos
(B, 3, T, H, W) float in [0, 1]) -> latents (B, C, T', H', W')` and `decode(latents) -> videos`.

VAE specs (the `--vae` option):
    pixel                     models.vae.PixelVAE: latents = 2 * pixels - 1, same shape (the demo)
    patch:P                   PatchVAE: the pixel latents with P x P spatial patches folded into
                              channels, (3 P^2, T, H / P, W / P); lossless, for CPU tests of shapes
    diffusers:<folder>        a diffusers video VAE (AutoencoderKLWan, ...) saved in <folder> (its
                              config.json names the class); needs `diffusers` installed
Text-encoder specs (`--text-encoder`):
    none | hash | hash:<dim>:<max_tokens>   the demo's models.text.HashTextEncoder
    diffusers:[<max_tokens>:]<folder>        a diffusers pipeline folder's text_encoder/ + tokenizer/
                                             (UMT5 for Wan2.1; models.wan.WanTextEncoder, as a
                                             model.kind=diffusers_wan run encodes); max_tokens as the
                                             run's model.max_text_tokens, default 512 (Wan's)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ddrl_scale.models.text import HashTextEncoder
from ddrl_scale.models.vae import PixelVAE


class PatchVAE:
    """Lossless "VAE" for tests: pixel latents with P x P patches moved into channels."""

    def __init__(self, patch: int = 2):
        if patch < 1:
            raise ValueError(f"PatchVAE: patch must be >= 1, got {patch}")
        self.patch = patch
        self.latent_channels = 3 * patch * patch

    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        """videos (B, 3, T, H, W) in [0, 1] -> latents (B, 3 P^2, T, H / P, W / P) in [-1, 1]."""
        batch, channels, frames, height, width = videos.shape
        p = self.patch
        if height % p or width % p:
            raise ValueError(f"PatchVAE: height {height} and width {width} must be multiples of {p}")
        x = (videos * 2.0 - 1.0).reshape(batch, channels, frames, height // p, p, width // p, p)
        return x.permute(0, 1, 4, 6, 2, 3, 5).reshape(batch, channels * p * p, frames, height // p,
                                                     width // p)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = latents.shape
        p = self.patch
        x = latents.float().reshape(batch, channels // (p * p), p, p, frames, height, width)
        x = x.permute(0, 1, 4, 5, 2, 6, 3).reshape(batch, channels // (p * p), frames, height * p,
                                                    width * p)
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


class DiffusersVideoVAE:
    """Adapter: a diffusers video autoencoder behind the encode/decode interface of models/vae.py.

    Latents are the posterior mode, normalised the way the model's pipelines do it: per channel with
    `latents_mean` / `latents_std` when the config has them (Wan), else `(z - shift_factor) *
    scaling_factor` (CogVideoX, HunyuanVideo).
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        config = model.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1, 1) if mean is not None else None
        self.std = torch.tensor(std).view(1, -1, 1, 1, 1) if std is not None else None
        self.scaling = float(getattr(config, "scaling_factor", None) or 1.0)
        self.shift = float(getattr(config, "shift_factor", None) or 0.0)
        self.latent_channels = int(getattr(config, "z_dim", None) or getattr(config, "latent_channels", 0))

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> DiffusersVideoVAE:
        try:
            import diffusers
        except ImportError:
            raise ValueError("--vae diffusers:...: the 'diffusers' package is not installed") from None
        config_path = Path(folder) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"--vae diffusers:{folder}: no config.json in that folder")
        class_name = json.loads(config_path.read_text()).get("_class_name", "")
        model_class = getattr(diffusers, class_name, None)
        if model_class is None:
            raise ValueError(f"--vae diffusers:{folder}: config.json names class {class_name!r}, "
                             "which this diffusers does not have")
        return cls(model_class.from_pretrained(str(folder)), device, dtype)

    @torch.no_grad()
    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        x = (videos * 2.0 - 1.0).to(self.device, self.dtype)
        latents = self.model.encode(x).latent_dist.mode().float()
        if self.mean is not None and self.std is not None:
            return (latents - self.mean.to(latents)) / self.std.to(latents)
        return (latents - self.shift) * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float().to(self.device)
        if self.mean is not None and self.std is not None:
            z = z * self.std.to(z) + self.mean.to(z)
        else:
            z = z / self.scaling + self.shift
        videos = self.model.decode(z.to(self.dtype)).sample.float()
        return ((videos + 1.0) / 2.0).clamp(0.0, 1.0)


def build_vae(spec: str, device: str = "cpu"):
    """A VAE from its spec string (see the module docstring)."""
    if spec == "pixel":
        return PixelVAE()
    if spec.startswith("patch:"):
        try:
            return PatchVAE(int(spec.split(":", 1)[1]))
        except ValueError:
            raise ValueError(f"--vae {spec!r}: expected patch:<positive int>") from None
    if spec.startswith("diffusers:"):
        return DiffusersVideoVAE.from_folder(spec.split(":", 1)[1], device)
    raise ValueError(f"--vae {spec!r}: expected pixel, patch:<P> or diffusers:<folder>")


WAN_MAX_TOKENS = 512  # the Wan pipeline's max_sequence_length


def build_text_encoder(spec: str, device: str = "cpu"):
    """None for 'none', else an encoder with `encode(prompts) -> (B, max_tokens, dim)` (see above)."""
    if spec == "none":
        return None
    if spec.startswith("diffusers:"):
        from ddrl_scale.models.wan import WanTextEncoder

        rest = spec.split(":", 1)[1]
        tokens, _, folder = rest.partition(":")
        if not (tokens.isdigit() and folder):
            tokens, folder = str(WAN_MAX_TOKENS), rest
        return WanTextEncoder(folder, int(tokens), device)
    if spec == "hash":
        return HashTextEncoder()
    parts = spec.split(":")
    if parts[0] == "hash" and len(parts) == 3 and all(part.isdigit() for part in parts[1:]):
        return HashTextEncoder(int(parts[1]), int(parts[2]))
    raise ValueError(f"--text-encoder {spec!r}: expected none, hash, hash:<dim>:<max_tokens> or "
                     f"diffusers:[<max_tokens>:]<folder>")
