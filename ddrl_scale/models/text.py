"""Frozen text encoder of the built-in demo: prompts -> embeddings (B, L, dim) for cross-attention.

No model hub at run time, so the demo's encoder is a fixed function of the words: each word maps to a
random vector seeded by a stable hash of the word, plus a sinusoidal position code so that word order
("red square on a grey background") is visible. Padding positions are zero (as Wan2.1 zeroes the
padding of its T5 embeddings), so no attention mask is needed. Real models plug in their own encoder
behind the same `encode(prompts) -> Tensor` call.
"""

from __future__ import annotations

import math
import re
import zlib

import torch


class HashTextEncoder:
    def __init__(self, dim: int = 32, max_tokens: int = 12):
        self.dim, self.max_tokens = dim, max_tokens
        self._word_vectors: dict[str, torch.Tensor] = {}
        position = torch.arange(max_tokens, dtype=torch.float64)[:, None]
        frequencies = torch.exp(-math.log(100.0) * torch.arange(0, dim, 2) / dim)[None, :]
        self._positions = torch.zeros(max_tokens, dim)
        self._positions[:, 0::2] = torch.sin(position * frequencies).float()
        self._positions[:, 1::2] = torch.cos(position * frequencies).float()

    @staticmethod
    def words(prompt: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", prompt.lower())

    def _vector(self, word: str) -> torch.Tensor:
        if word not in self._word_vectors:
            generator = torch.Generator().manual_seed(zlib.crc32(word.encode()))
            self._word_vectors[word] = torch.randn(self.dim, generator=generator)
        return self._word_vectors[word]

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """Embeddings (B, max_tokens, dim), float32; words past max_tokens are dropped."""
        out = torch.zeros(len(prompts), self.max_tokens, self.dim)
        for row, prompt in enumerate(prompts):
            words = self.words(prompt)[: self.max_tokens]
            for column, word in enumerate(words):
                out[row, column] = self._vector(word) + self._positions[column]
        return out.to(device)
