"""`ddrl ckpt export`: consolidate a (possibly sharded) checkpoint into one safetensors file.

The file carries the DiT config in its metadata, so `model.init_checkpoint=FILE` starts a new run
from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ddrl_scale.models import DiTConfig, VideoDiT, save_weights
from ddrl_scale.train.checkpoint import latest_checkpoint, read_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest complete checkpoint)."""
    path = Path(path)
    if (path / "trainer_state.pt").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"'{path}' is neither a checkpoint folder nor a run folder with one")
    return latest


def export_checkpoint(path: str | Path, out: str | Path, ema: bool = False, dtype: str = "fp32") -> Path:
    checkpoint = resolve_checkpoint(path)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
    model = VideoDiT(DiTConfig.from_dict(json.loads(state["dit_config"])))
    model.load_state_dict(read_weights(checkpoint, ema=ema))
    model.to(DTYPES[dtype])
    return save_weights(model, out, extra={"exported_from": str(checkpoint), "ema": ema,
                                           "step": int(state["step"])})
