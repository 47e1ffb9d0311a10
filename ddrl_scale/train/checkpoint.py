"""Checkpoints of a run: everything needed to resume exactly (the "save" hook of the trainer loop).

Layout: RUN_DIR/checkpoints/step_000040/{model.safetensors, ema.safetensors, state.pt}; `state.pt`
holds the optimizer, schedule, RNG and loader states and is read with `weights_only=True`.
A checkpoint folder is written under a temporary name and renamed when complete, so a crash while
saving never leaves a half checkpoint that resume would pick.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


def save_checkpoint(run_dir: str | Path, step: int, engine_state: dict, extra: dict) -> Path:
    """Write step `step`: model and EMA as safetensors, optimizer/schedule/`extra` in state.pt."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    partial = root / f".partial_step_{step:06d}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(_tensors(engine_state["model"]), str(partial / "model.safetensors"))
    if engine_state.get("ema") is not None:
        save_file(_tensors(engine_state["ema"]), str(partial / "ema.safetensors"))
    rest = {key: value for key, value in engine_state.items() if key not in ("model", "ema")}
    torch.save({"step": step, "engine": rest, **extra}, partial / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    logger.info("saved checkpoint %s", final)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = [(int(match.group(1)), path) for path in root.iterdir()
             if (match := _STEP_DIR.match(path.name)) and (path / "state.pt").is_file()]
    return max(steps)[1] if steps else None


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """Return (engine_state, extra) of a checkpoint folder written by `save_checkpoint`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder '{path}' does not exist")
    for name in ("model.safetensors", "state.pt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint '{path}' is incomplete: '{name}' is missing")
    extra = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    engine_state = dict(extra.pop("engine"))
    engine_state["model"] = load_file(str(path / "model.safetensors"))
    ema = path / "ema.safetensors"
    engine_state["ema"] = load_file(str(ema)) if ema.is_file() else None
    return engine_state, extra
