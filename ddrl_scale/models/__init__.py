"""Models: the video DiT policy, its text encoder and VAE, and the shipped base checkpoint."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ddrl_scale.models.dit import DiTConfig, VideoDiT
from ddrl_scale.models.dit import flops_per_sample as dit_flops_per_sample
from ddrl_scale.models.text import HashTextEncoder
from ddrl_scale.models.vae import PixelVAE

__all__ = ["DiTConfig", "HashTextEncoder", "PixelVAE", "VideoDiT", "build_model", "build_vae",
           "flops_per_sample", "load_weights", "policy_from_dict", "save_weights"]

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


# --- model.kind dispatch (dit | diffusers_wan); begin ---
def build_model(config) -> torch.nn.Module:
    """The policy of a `RunConfig`: model.kind=dit a VideoDiT initialised from
    `model.init_checkpoint` when set; diffusers_wan the Wan adapter of models/wan.py."""
    if config.model.kind == "diffusers_wan":
        from ddrl_scale.config.schema import ConfigError
        from ddrl_scale.models.wan import load_wan_policy

        if config.parallel.engine == "megatron":
            raise ConfigError("config key 'parallel.engine': expected none|fsdp2|deepspeed with "
                              "model.kind=diffusers_wan (the Megatron engine builds the DiT), got 'megatron'")
        policy = load_wan_policy(config)
        if config.parallel.cp > 1:  # indivisible heads or tokens fail here, before any collective
            from ddrl_scale.parallel.wan_context_parallel import check_divisible

            check_divisible(policy.config, config.parallel.cp)
        return policy
    model = VideoDiT(dit_config_from(config))
    if config.model.init_checkpoint.lower() not in ("", "none"):
        load_weights(model, config.model.init_checkpoint)
    return model


def policy_from_dict(values: dict) -> torch.nn.Module:
    """A randomly initialised policy of a config recorded by a checkpoint ("dit_config")."""
    if values.get("kind", "dit") == "diffusers_wan":
        from ddrl_scale.models.wan import wan_policy_from_dict

        return wan_policy_from_dict(values)
    return VideoDiT(DiTConfig.from_dict(values))


def flops_per_sample(model_config, training: bool = True) -> float:
    """Matmul FLOPs of one sample (x3 with `training`) of either policy kind, from its `config`:
    a DiTConfig (`models.dit.flops_per_sample`) or a WanPolicyConfig (`models.wan`)."""
    if getattr(model_config, "kind", "dit") == "diffusers_wan":
        from ddrl_scale.models.wan import wan_flops_per_sample

        return wan_flops_per_sample(model_config, training)
    return dit_flops_per_sample(model_config, training)


def _wan_component(config, setting: str, sub: str) -> bool:
    """Whether a diffusers_wan run uses the pretrained folder's `sub`/ (auto: when it is there)."""
    if config.model.kind != "diffusers_wan" or setting in ("hash", "pixel"):
        return False
    present = (Path(config.model.pretrained) / sub).is_dir()
    if setting == "pretrained" and not present:
        raise FileNotFoundError(f"model.{'text_encoder' if sub == 'text_encoder' else 'vae'}=pretrained: "
                                f"'{config.model.pretrained}' has no {sub}/ folder")
    return present


def build_text_encoder(config, device: str | torch.device = "cpu"):
    """The run's text encoder: `encode(prompts, device) -> (B, max_text_tokens, text_dim)`."""
    if _wan_component(config, config.model.text_encoder, "text_encoder"):
        from ddrl_scale.config.schema import ConfigError
        from ddrl_scale.models.wan import WanTextEncoder

        # bf16 on GPUs for a bf16 run, as the Wan pipeline runs it: UMT5-XXL is ~19 GB in fp32
        dtype = (torch.bfloat16 if torch.device(device).type == "cuda" and config.run.dtype == "bf16"
                 else torch.float32)
        encoder = WanTextEncoder(config.model.pretrained, config.model.max_text_tokens, device, dtype)
        width = getattr(encoder.model.config, "d_model", config.model.text_dim)
        if width != config.model.text_dim:  # else the first forward fails far from the cause
            raise ConfigError(f"config key 'model.text_dim': expected {width} (the width of "
                              f"'{config.model.pretrained}/text_encoder'), got {config.model.text_dim}")
        return encoder
    return HashTextEncoder(config.model.text_dim, config.model.max_text_tokens)


def build_vae(config, device: str | torch.device = "cpu"):
    """The run's VAE: the demo's PixelVAE, or a diffusers_wan folder's vae/ (AutoencoderKLWan)."""
    if _wan_component(config, config.model.vae, "vae"):
        from ddrl_scale.data.encoders import DiffusersVideoVAE

        return DiffusersVideoVAE.from_folder(Path(config.model.pretrained) / "vae", str(device))
    return PixelVAE()
# --- model.kind dispatch; end ---

