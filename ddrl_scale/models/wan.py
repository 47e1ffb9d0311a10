"""Wan2.1 text-to-video from diffusers behind the policy interface of the built-in DiT.

Place in the data flow (docs/architecture.md): the policy that rollouts sample from and the
trainer updates (`model.kind=diffusers_wan`), in place of `models/dit.py`'s VideoDiT. The adapter
`WanPolicy` holds a diffusers `WanTransformer3DModel` read from a local folder (`model.pretrained`,
`from_pretrained`, safetensors, never a hub) and exposes
`forward(latents (B, C, T, H, W), sigma (B,) in [0, 1], text (B, L, D)) -> velocity (B, C, T, H, W)`,
a `blocks` list (the Wan blocks, for FSDP2 / activation checkpointing / compile in parallel/) and a
`config` whose `to_dict()` round-trips (checkpoints record it as "dit_config").

Flow-matching convention, ours -> Wan (diffusers' FlowMatchEulerDiscreteScheduler / UniPC with
`prediction_type="flow_prediction"`, as the Wan pipelines use them):
    noising      both x_sigma = (1 - sigma) x0 + sigma noise, sigma 1 (noise) -> 0 (data)
    timestep     the transformer is conditioned on t = sigma * num_train_timesteps = 1000 sigma
                 (`model.timestep_scale`), a float, not rounded
    velocity     both predict v = noise - x0 (the scheduler steps x + (sigma_next - sigma) v), so
                 ours = +1 * Wan's output (`model.velocity_sign`)
    shift        diffusers' shifted sigmas s sigma / (1 + (s - 1) sigma) (`flow_shift` /
                 `shift` of scheduler_config.json; Wan2.1: 3.0 at 480p, 5.0 at 720p) are our
                 `sampler.shift`; `scheduler_shift(folder)` reads the folder's value
The test `tests/test_wan_adapter.py` checks this mapping against diffusers' own scheduler step.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ddrl_scale.config.schema import ConfigError
from ddrl_scale.models.rope import Fp32Buffers

logger = logging.getLogger(__name__)

WAN_KIND = "diffusers_wan"
TRANSFORMER_CLASS = "WanTransformer3DModel"


def require_diffusers():
    """The diffusers module, or an ImportError that says how to get it."""
    try:
        import diffusers
    except ImportError:
        raise ImportError("model.kind=diffusers_wan needs the 'diffusers' package "
                          "(pip install 'ddrl-scale[diffusers]', tested with diffusers==0.42.1)") from None
    return diffusers


def _jsonable(value):
    """Tuples (diffusers keeps patch_size as one) become lists, so configs compare after a JSON trip."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(item) for item in value]
    return value


def transformer_config_dict(transformer: nn.Module) -> dict:
    """The diffusers config of a WanTransformer3DModel, without diffusers' private `_` keys."""
    return {key: _jsonable(value) for key, value in dict(transformer.config).items()
            if not key.startswith("_")}


@dataclass
class WanPolicyConfig:
    """What a checkpoint needs to rebuild the policy: the transformer's diffusers config, the latent
    video shape the run trains on, and the convention mapping (see the module docstring)."""

    transformer: dict = field(default_factory=dict)  # WanTransformer3DModel config (diffusers keys)
    in_channels: int = 16
    num_frames: int = 21
    height: int = 60
    width: int = 104
    max_text_tokens: int = 512
    timestep_scale: float = 1000.0
    velocity_sign: float = 1.0
    pretrained: str = ""  # where the starting weights came from (informational)
    kind: str = WAN_KIND

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer["patch_size"])

    @property
    def num_heads(self) -> int:
        return int(self.transformer["num_attention_heads"])

    @property
    def hidden_size(self) -> int:
        return self.num_heads * int(self.transformer["attention_head_dim"])

    @property
    def depth(self) -> int:
        return int(self.transformer["num_layers"])

    @property
    def text_dim(self) -> int:
        return int(self.transformer["text_dim"])

    @property
    def grid(self) -> tuple[int, int, int]:
        """Tokens per axis (frames, height, width) after patching."""
        pt, ph, pw = self.patch_size
        return self.num_frames // pt, self.height // ph, self.width // pw

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def to_dict(self) -> dict:
        return {**asdict(self), "transformer": {k: _jsonable(v) for k, v in self.transformer.items()}}

    @classmethod
    def from_dict(cls, values: dict) -> WanPolicyConfig:
        values = dict(values)
        if values.get("kind") != WAN_KIND:
            raise ValueError(f"not a {WAN_KIND} policy config: kind={values.get('kind')!r}")
        return cls(**values)


class WanPolicy(Fp32Buffers):
    """A diffusers WanTransformer3DModel as a DDRL policy (velocity in our convention).

    Parameter names are the transformer's with a `transformer.` prefix; `export_state_dict()` gives
    them without it, as diffusers saves them.
    """

    def __init__(self, transformer: nn.Module, config: WanPolicyConfig):
        super().__init__()
        self.transformer = transformer
        self.config = config

    @property
    def blocks(self) -> nn.ModuleList:
        # a property, not an attribute: registering the ModuleList twice would list every block
        # parameter twice in state_dict()
        return self.transformer.blocks

    def fp32_buffers(self):
        # Wan's rotary tables (WanRotaryPosEmbed.freqs_cos / freqs_sin): diffusers keeps its `rope`
        # module fp32 only when it loads with a torch_dtype, not through a later module cast
        rope = getattr(self.transformer, "rope", None)
        for name in ("freqs_cos", "freqs_sin"):
            if rope is not None and name in rope._buffers:
                yield rope, name

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """latents (B, C, T, H, W), sigma (B,) in [0, 1], text (B, L, text_dim) -> v = noise - x0."""
        config = self.config
        expected = (config.in_channels, config.num_frames, config.height, config.width)
        if tuple(latents.shape[1:]) != expected:
            raise ValueError(f"WanPolicy expects latents (B, {expected}), got {tuple(latents.shape)}")
        if text.shape[-1] != config.text_dim:
            raise ValueError(f"WanPolicy expects text embeddings (B, L, {config.text_dim}), "
                             f"got {tuple(text.shape)}")
        # float timesteps in fp32: Wan's sinusoidal embedding of t in [0, 1000] needs the precision
        timestep = sigma.reshape(-1).float() * config.timestep_scale
        # latents to the parameters' dtype here, not by FSDP2's input cast, which would also round
        # the timestep and the rotary embeddings passed to each block (parallel/parallelize.py)
        latents = latents.to(self.transformer.patch_embedding.weight.dtype)
        out = self.transformer(latents, timestep, text.to(latents.dtype), return_dict=False)[0]
        return out if config.velocity_sign == 1.0 else -out

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The transformer's tensors under diffusers' own names (detached, on the CPU, contiguous)."""
        return {name: tensor.detach().cpu().contiguous()
                for name, tensor in self.transformer.state_dict().items()}


# -- building ------------------------------------------------------------------------------------
def transformer_folder(pretrained: str | Path) -> Path:
    """`<pretrained>/transformer` of a pipeline folder, or `pretrained` itself if it is the
    transformer's own folder (its config.json names WanTransformer3DModel)."""
    root = Path(pretrained)
    if not root.is_dir():
        raise FileNotFoundError(f"model.pretrained: '{root}' is not a folder (expected a local "
                                f"diffusers folder with transformer/)")
    for folder in (root / "transformer", root):
        config_path = folder / "config.json"
        if config_path.is_file():
            class_name = json.loads(config_path.read_text()).get("_class_name")
            if class_name != TRANSFORMER_CLASS:
                raise ValueError(f"model.pretrained: '{config_path}' names class {class_name!r}, "
                                 f"expected {TRANSFORMER_CLASS} (Wan2.1 text-to-video)")
            if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
                raise FileNotFoundError(f"model.pretrained: '{folder}' has no .safetensors weights "
                                        f"(only safetensors are read)")
            return folder
    raise FileNotFoundError(f"model.pretrained: '{root}' has neither transformer/config.json nor "
                            f"config.json")


def scheduler_shift(pretrained: str | Path) -> float | None:
    """The flow shift of `<pretrained>/scheduler/scheduler_config.json` (UniPC: `flow_shift`,
    FlowMatchEuler: `shift`), or None when the folder has no scheduler config."""
    path = Path(pretrained) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    values = json.loads(path.read_text())
    for key in ("flow_shift", "shift"):
        if values.get(key) is not None:
            return float(values[key])
    return None


def _check_matches(config: WanPolicyConfig, model, video, where: str) -> None:
    """The run config's shapes must agree with the transformer's; ConfigError naming the keys."""
    transformer = config.transformer
    if transformer.get("image_dim") is not None or transformer.get("added_kv_proj_dim") is not None:
        raise ConfigError(f"{where}: image-conditioned Wan (image_dim / added_kv_proj_dim set) is not "
                          f"supported; use a text-to-video transformer")
    out_channels = transformer.get("out_channels") or transformer["in_channels"]
    checks = [
        ("video.channels", video.channels, transformer["in_channels"], "the transformer's in_channels"),
        ("video.channels", video.channels, out_channels, "the transformer's out_channels"),
        ("model.patch_size", list(model.patch_size), list(config.patch_size), "the transformer's patch_size"),
        ("model.text_dim", model.text_dim, config.text_dim, "the transformer's text_dim"),
    ]
    for key, got, want, what in checks:
        if got != want:
            raise ConfigError(f"config key '{key}': expected {want!r} ({what} in {where}), got {got!r}")
    rope = int(transformer.get("rope_max_seq_len", 1024))
    if max(config.grid) > rope:
        raise ConfigError(f"config key 'video': the token grid {config.grid} exceeds the transformer's "
                          f"rope_max_seq_len={rope} ({where})")


def policy_config_from(config, transformer: nn.Module) -> WanPolicyConfig:
    """The WanPolicyConfig of a RunConfig (model and video sections) and a loaded transformer."""
    model, video = config.model, config.video
    return WanPolicyConfig(
        transformer=transformer_config_dict(transformer), in_channels=video.channels,
        num_frames=video.num_frames, height=video.height, width=video.width,
        max_text_tokens=model.max_text_tokens, timestep_scale=model.timestep_scale,
        velocity_sign=model.velocity_sign, pretrained=str(model.pretrained))


def load_wan_policy(config) -> WanPolicy:
    """The policy of a RunConfig with model.kind=diffusers_wan: the transformer of
    `model.pretrained`, then (if set to a file) the weights of `model.init_checkpoint`."""
    diffusers = require_diffusers()
    folder = transformer_folder(config.model.pretrained)
    # no torch_dtype: weights come in as the model's fp32 parameters (the engine casts for
    # compute); diffusers refuses an explicit dtype without `accelerate` for Wan's fp32-kept modules
    transformer = diffusers.WanTransformer3DModel.from_pretrained(
        str(folder), local_files_only=True, use_safetensors=True)
    policy = WanPolicy(transformer, policy_config_from(config, transformer))
    _check_matches(policy.config, config.model, config.video, str(folder))
    shift = scheduler_shift(config.model.pretrained)
    if shift is not None and not math.isclose(shift, config.sampler.shift):
        logger.warning("sampler.shift=%s differs from the folder's scheduler shift %s (%s)",
                       config.sampler.shift, shift, config.model.pretrained)
    init = config.model.init_checkpoint
    if init.lower() not in ("", "none", "builtin:base"):  # builtin:base is the demo DiT's: not Wan's
        load_wan_weights(policy, init)
    return policy


def wan_policy_from_dict(values: dict) -> WanPolicy:
    """A randomly initialised policy of a recorded WanPolicyConfig (to load a checkpoint into)."""
    diffusers = require_diffusers()
    config = WanPolicyConfig.from_dict(values)
    transformer = diffusers.WanTransformer3DModel.from_config(dict(config.transformer))
    return WanPolicy(transformer, config)


def load_wan_weights(policy: WanPolicy, path: str | Path) -> str:
    """Load a single-file export (`ddrl ckpt export --format safetensors` of a Wan run) into `policy`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_checkpoint: '{path}' does not exist")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "dit_config" in metadata:
        saved = json.loads(metadata["dit_config"])
        if saved.get("kind") != WAN_KIND or _jsonable(saved.get("transformer")) != policy.config.transformer:
            raise ValueError(f"model.init_checkpoint '{path}' was saved for {saved.get('transformer')}, "
                             f"but model.pretrained builds {policy.config.transformer}")
    policy.transformer.load_state_dict(load_file(str(path)))
    return str(path)


# -- text encoder --------------------------------------------------------------------------------
class WanTextEncoder:
    """The pipeline folder's text encoder (UMT5 for Wan2.1) behind `encode(prompts, device)`.

    Like the Wan pipeline (diffusers' WanPipeline.encode_prompt): prompts cleaned as it cleans them,
    tokens up to max_tokens, the encoder's last hidden state, positions past each prompt's length
    set to zero (so no attention mask is needed downstream).
    """

    def __init__(self, folder: str | Path, max_tokens: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        try:
            import transformers
        except ImportError:
            raise ImportError("model.text_encoder=pretrained needs the 'transformers' package") from None
        root = Path(folder)
        for sub in ("text_encoder", "tokenizer"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"model.pretrained: '{root}' has no {sub}/ folder")
        config = json.loads((root / "text_encoder" / "config.json").read_text())
        architecture = (config.get("architectures") or ["UMT5EncoderModel"])[0]
        model_class = getattr(transformers, architecture, None)
        if model_class is None:
            raise ValueError(f"'{root / 'text_encoder' / 'config.json'}' names {architecture!r}, which "
                             f"this transformers does not have")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"),
                                                                    local_files_only=True)
        # `dtype`, not the older `torch_dtype` that transformers 5 only keeps for compatibility
        self.model = model_class.from_pretrained(str(root / "text_encoder"), local_files_only=True,
                                                 dtype=dtype).to(device).eval().requires_grad_(False)
        self.max_tokens, self.device = max_tokens, torch.device(device)

    @staticmethod
    def clean(prompt: str) -> str:
        """The Wan pipeline's prompt cleaning: HTML entities unescaped (twice, for doubly escaped
        captions), whitespace runs collapsed to one space, ends stripped. The pipeline also runs ftfy
        when that package is installed; it is not a dependency here, so mojibake is left as it is."""
        return re.sub(r"\s+", " ", html.unescape(html.unescape(prompt)).strip()).strip()

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """Embeddings (B, max_tokens, dim), float32, zero past each prompt's tokens."""
        # cleaned like the pipeline the model was trained with: "a  cat &amp; dog" must give the
        # tokens of "a cat & dog", or the policy is conditioned on text it never saw
        tokens = self.tokenizer([self.clean(prompt) for prompt in prompts], padding="max_length",
                                max_length=self.max_tokens, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(tokens.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        # zeros written, not multiplied in: like the pipeline's cut-and-pad, exact zeros even where a
        # low-precision encoder left inf or NaN in a padded position
        return hidden.float().masked_fill(mask[..., None] == 0, 0.0).to(device)


# -- FLOPs -----------------------------------------------------------------------------------------
def wan_flops_per_sample(config: WanPolicyConfig, training: bool = True) -> float:
    """Matmul FLOPs of one sample's forward (x3 with `training`), counted like
    `models.dit.flops_per_sample`: 2 * in * out per token of each linear (and the patch
    convolution, a linear over patches), 4 * N * M * dim per attention; norms, rotary and the
    elementwise adaLN are left out. Text length: config.max_text_tokens."""
    transformer = config.transformer
    dim, tokens, text = config.hidden_size, config.num_tokens, config.max_text_tokens
    ffn, freq = int(transformer["ffn_dim"]), int(transformer["freq_dim"])
    patch_in = config.in_channels * math.prod(config.patch_size)
    out_channels = int(transformer.get("out_channels") or config.in_channels)
    patch_out = out_channels * math.prod(config.patch_size)

    def linear(n: int, fan_in: int, fan_out: int) -> float:
        return 2.0 * n * fan_in * fan_out

    per_block = (
        4 * linear(tokens, dim, dim) + 4.0 * tokens * tokens * dim  # self-attention
        + 2 * linear(tokens, dim, dim) + 2 * linear(text, dim, dim)  # cross-attention q, o; k, v
        + 4.0 * tokens * text * dim
        + linear(tokens, dim, ffn) + linear(tokens, ffn, dim)  # feed-forward
    )
    forward = (
        linear(tokens, patch_in, dim)  # patch embedding (Conv3d with stride = kernel)
        + linear(1, freq, dim) + linear(1, dim, dim) + linear(1, dim, 6 * dim)  # timestep
        + linear(text, config.text_dim, dim) + linear(text, dim, dim)  # text projection
        + config.depth * per_block + linear(tokens, dim, patch_out)  # blocks, output projection
    )
    return 3.0 * forward if training else forward
