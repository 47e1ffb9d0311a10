"""Video diffusion transformer: the policy that rollouts sample from and the trainer updates.

A plain `nn.Module` with no parallel code inside (engines in parallel/ wrap it). Input latents
(B, C, T, H, W), noise level sigma (B,) in [0, 1] and text embeddings (B, L, text_dim); output the
rectified-flow velocity v = noise - x0 with the latents' shape. Blocks: 3D patch embedding, 3D rotary
self-attention, cross-attention to the text, MLP, all conditioned on the timestep by adaLN-zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ddrl_scale.models.attention import attention
from ddrl_scale.models.rope import Fp32Buffers, apply_rope, rope_angles
from ddrl_scale.runtime import upcast


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 3
    num_frames: int = 8
    height: int = 16
    width: int = 16
    patch_size: tuple[int, int, int] = (2, 2, 2)
    hidden_size: int = 96
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 32
    max_text_tokens: int = 12
    qk_norm: bool = True
    attention_backend: str = "auto"

    @property
    def grid(self) -> tuple[int, int, int]:
        """Tokens per axis (frames, height, width) after patching."""
        return (self.num_frames // self.patch_size[0], self.height // self.patch_size[1],
                self.width // self.patch_size[2])

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> DiTConfig:
        values = dict(values)
        values["patch_size"] = tuple(values["patch_size"])
        return cls(**values)


def timestep_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of sigma (B,) in [0, 1], scaled to [0, 1000] like DDPM steps."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=sigma.device) / half)
    angles = 1000.0 * upcast(sigma)[:, None] * frequencies[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class MultiHeadAttention(nn.Module):
    """Self-attention (with 3D rotary) when `context` is None, else cross-attention to `context`."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, qk_norm: bool, backend: str):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(context_dim, dim)
        self.value = nn.Linear(context_dim, dim)
        self.out = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.query_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.key_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        source = x if context is None else context
        query = self.query_norm(self._heads(self.query(x)))
        key = self.key_norm(self._heads(self.key(source)))
        value = self._heads(self.value(source))
        out = self.core_attention(query, key, value, rope)
        # (B, heads, N, head_dim) -> (B, N, heads * head_dim); heads may be a tensor-parallel share
        return self.out(out.transpose(1, 2).reshape(*x.shape[:-1], -1))

    def core_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       rope: torch.Tensor | None) -> torch.Tensor:
        """Rotary + attention over (B, heads, N, head_dim); context parallel replaces this method."""
        if rope is not None:
            query, key = apply_rope(query, rope), apply_rope(key, rope)
        return attention(query, key, value, self.backend)


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(dim, config.num_heads, dim, config.qk_norm,
                                            config.attention_backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = MultiHeadAttention(dim, config.num_heads, dim, config.qk_norm,
                                             config.attention_backend)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, config.mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.mlp_hidden, dim))
        # adaLN-zero: shift, scale, gate for self-attention and for the MLP, from the timestep
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, condition: torch.Tensor, text: torch.Tensor,
                rope: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(condition).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.self_attn(modulate(self.norm1(x), shift1, scale1), rope=rope)
        x = x + self.cross_attn(self.norm2(x), context=text)
        return x + gate2[:, None] * self.mlp(modulate(self.norm3(x), shift2, scale2))


class VideoDiT(Fp32Buffers):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        patch_volume = math.prod(config.patch_size)
        self.patch_embed = nn.Linear(config.in_channels * patch_volume, dim)
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_embed = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                        nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final_proj = nn.Linear(dim, config.in_channels * patch_volume)
        self.register_buffer("rope", rope_angles(config.grid, dim // config.num_heads),
                             persistent=False)
        self.reset_parameters()

    def fp32_buffers(self):
        yield self, "rope"  # rotary angles: bf16 would move every token (models/rope.py)

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # zero-init the residual gates, the cross-attention output and the final layer: at init
        # every block is the identity and the output is zero (adaLN-zero)
        for block in self.blocks:
            for layer in (block.modulation[-1], block.cross_attn.out):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        for layer in (self.final_modulation[-1], self.final_proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, N, C * pt * ph * pw), tokens in (t, h, w) row-major order."""
        batch, channels = latents.shape[:2]
        (pt, ph, pw), (gt, gh, gw) = self.config.patch_size, self.config.grid
        x = latents.reshape(batch, channels, gt, pt, gh, ph, gw, pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, gt * gh * gw, -1)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of `patchify`: (B, N, C * pt * ph * pw) -> (B, C, T, H, W)."""
        batch, channels = tokens.shape[0], self.config.in_channels
        (pt, ph, pw), (gt, gh, gw) = self.config.patch_size, self.config.grid
        x = tokens.reshape(batch, gt, gh, gw, channels, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, channels, gt * pt, gh * ph, gw * pw)

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """latents (B, C, T, H, W), sigma (B,) in [0, 1], text (B, L, text_dim) -> velocity like latents."""
        expected = (self.config.in_channels, self.config.num_frames, self.config.height, self.config.width)
        if tuple(latents.shape[1:]) != expected:
            raise ValueError(f"VideoDiT expects latents (B, {expected}), got {tuple(latents.shape)}")
        # to the parameters' dtype here, not by FSDP2's input cast, which would also round sigma and
        # the rotary angles to bf16 (parallel/parallelize.py); a no-op in fp32 and under autocast
        x = self.patch_embed(self.patchify(latents).to(self.patch_embed.weight.dtype))
        condition = self.time_embed(timestep_embedding(sigma, self.config.hidden_size).to(x.dtype))
        context = self.text_embed(text.to(x.dtype))
        for block in self.blocks:
            x = block(x, condition, context, self.rope)
        shift, scale = self.final_modulation(condition).chunk(2, dim=-1)
        x = self.final_proj(modulate(self.final_norm(x), shift, scale))
        return self.unpatchify(x)


def flops_per_sample(config: DiTConfig, training: bool = True) -> float:
    """Matmul FLOPs of one sample's forward pass (x3 with `training`: backward is about 2x forward).

    Counts 2 * in * out per token for every linear layer and 2 * 2 * N * M * dim for each attention
    (scores and weighted sum); elementwise work, norms and rotary are left out, as MFU conventions do.
    """
    dim, tokens, text = config.hidden_size, config.num_tokens, config.max_text_tokens
    patch_in = config.in_channels * math.prod(config.patch_size)

    def linear(n: int, fan_in: int, fan_out: int) -> float:
        return 2.0 * n * fan_in * fan_out

    per_block = (
        linear(tokens, dim, 3 * dim) + linear(tokens, dim, dim)  # self-attention projections
        + 4.0 * tokens * tokens * dim  # self-attention scores and weighted sum
        + linear(tokens, dim, dim) + linear(text, dim, 2 * dim) + linear(tokens, dim, dim)  # cross
        + 4.0 * tokens * text * dim
        + linear(tokens, dim, config.mlp_hidden) + linear(tokens, config.mlp_hidden, dim)
        + linear(1, dim, 6 * dim)  # adaLN modulation, once per sample
    )
    forward = (
        linear(tokens, patch_in, dim) + linear(1, dim, dim) * 2  # patch and timestep embeddings
        + linear(text, config.text_dim, dim) + linear(text, dim, dim)  # text embedding
        + config.depth * per_block
        + linear(1, dim, 2 * dim) + linear(tokens, dim, patch_in)  # final layer
    )
    return 3.0 * forward if training else forward
