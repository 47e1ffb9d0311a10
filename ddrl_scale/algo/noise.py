"""Keyed noise: every random draw of a run is a function of (seed, stream, step, sample index, ...).

So a sample's rollout noise, SDE noise and data-term noise do not depend on how the global batch
is split over ranks or on what ran before: a 2-rank run draws exactly what the 1-rank run draws,
and a resumed run needs no RNG state to continue the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

# stream ids: one per kind of draw
ROLLOUT_INIT, ROLLOUT_STEP, DATA_NOISE, DATA_SIGMA, TRAIN_STEPS, CAPTION_DROP = 1, 2, 3, 4, 5, 6


def key_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of ints (stable across runs, machines and Python versions)."""
    digest = hashlib.blake2b(",".join(str(int(part)) for part in key).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def keyed_normal(shape: Sequence[int], indices: Sequence[int], *key: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal (len(indices), *shape): row j depends only on (*key, indices[j])."""
    rows = []
    for index in indices:
        generator = torch.Generator(device=device).manual_seed(key_seed(*key, index))
        rows.append(torch.randn(tuple(shape), generator=generator, device=device))
    return torch.stack(rows)


def data_term_draws(shape: Sequence[int], indices: Sequence[int], *key: int,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (N, *shape) and logit-normal noise levels (N,) (as SD3 trains) for the flow-matching
    loss on the data items `indices`, keyed by `key`."""
    noise = keyed_normal(shape, indices, *key, DATA_NOISE, device=device)
    sigma = torch.sigmoid(keyed_normal((), indices, *key, DATA_SIGMA, device=device))
    return noise, sigma
