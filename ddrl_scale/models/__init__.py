"""Models: the video DiT policy, its text encoder and VAE, and the shipped base checkpoint."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ddrl_scale.models.dit import DiTConfig, VideoDiT, flops_per_sample
from ddrl_scale.models.text import HashTextEncoder
from ddrl_scale.models.vae import PixelVAE

__all__ = ["DiTConfig", "HashTextEncoder", "PixelVAE", "VideoDiT", "build_model", "flops_per_sample",
           "load_weights", "save_weights"]

BUILTIN_BASE = "builtin:base"


def dit_config_from(config) -> DiTConfig:
    """The DiT config of a `RunConfig` (its `model` and `video` sections)."""
    model, video = config.model, config.video
    return DiTConfig(
        in_channels=video.channels, num_frames=video.num_frames, height=video.height,
        width=video.width, patch_size=tuple(model.patch_size), hidden_size=model.hidden_size,
        depth=model.depth, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
        text_dim=model.text_dim, max_text_tokens=model.max_text_tokens, qk_norm=model.qk_norm,
        attention_backend=model.attention_backend,
    )


def builtin_path(name: str = "base") -> Path:
    return Path(str(resources.files("ddrl_scale") / "assets" / f"{name}_dit.safetensors"))


def save_weights(model: VideoDiT, path: str | Path, extra: dict | None = None) -> Path:
    """Save the weights as safetensors with the DiT config (and `extra`) as JSON metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"dit_config": json.dumps(model.config.to_dict())}
    metadata.update({key: json.dumps(value) for key, value in (extra or {}).items()})
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    return path


def load_weights(model: VideoDiT, spec: str) -> str:
    """Load `spec` (builtin:base or a .safetensors path) into `model`; returns the file used.

    The checkpoint's DiT config must equal the model's: a mismatch is an error naming both.
    """
    path = builtin_path() if spec == BUILTIN_BASE else Path(spec)
    if not path.is_file():
        hint = " (regenerate it with `ddrl pretrain`, see README)" if spec == BUILTIN_BASE else ""
        raise FileNotFoundError(f"model.init_checkpoint: '{path}' does not exist{hint}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "dit_config" in metadata:
        saved = DiTConfig.from_dict(json.loads(metadata["dit_config"]))
        # the attention backend is a run-time choice, not part of the weights
        if saved.to_dict() | {"attention_backend": ""} != model.config.to_dict() | {"attention_backend": ""}:
            raise ValueError(f"model.init_checkpoint '{path}' was saved for {saved}, "
                             f"but the config builds {model.config}")
    model.load_state_dict(load_file(str(path)))
    return str(path)


def build_model(config) -> VideoDiT:
    """The policy of a `RunConfig`, initialised from `model.init_checkpoint` when set."""
    model = VideoDiT(dit_config_from(config))
    if config.model.init_checkpoint.lower() not in ("", "none"):
        load_weights(model, config.model.init_checkpoint)
    return model


def build_text_encoder(config) -> HashTextEncoder:
    return HashTextEncoder(config.model.text_dim, config.model.max_text_tokens)

