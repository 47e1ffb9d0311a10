"""Checkpoints of a run: everything needed to resume exactly (the "save" hook of the trainer loop).

Layout: RUN_DIR/checkpoints/step_000040/ with engine/ (DCP: model, optimizer, EMA, sharded as the
engine holds them), engine_schedule.pt, trainer_state.pt (step, loader position) and
rng_rank{R}.pt (each rank's RNG states). A checkpoint is written under `.partial_step_N/` and renamed
when every rank has finished, so a crash mid-save never leaves a half checkpoint that resume would
pick; the newest `train.keep_last` complete ones are kept. Every file is read back through
`storage/safe_load.py`: tensors and plain data only, a file that holds code is refused by name.
"""

from __future__ import annotations

import logging
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ddrl_scale.parallel.distributed import World, barrier
from ddrl_scale.parallel.engine import Engine
from ddrl_scale.storage.safe_load import (
    CheckpointRefusedError,
    dcp_load,
    deepspeed_weights_only,
    load_pt,
    read_dcp_metadata,
)

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def rng_state() -> dict:
    _, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir()
             if (match := _STEP_DIR.match(path.name)) and (path / "trainer_state.pt").is_file()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, engine: Engine, trainer_state: dict,
                    world: World, keep_last: int = 2) -> Path:
    """Every rank calls: engine state (sharded), this rank's RNG, rank 0's trainer state."""
    root = Path(run_dir) / "checkpoints"
    final, partial = root / f"step_{step:06d}", root / f".partial_step_{step:06d}"
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier(world, "checkpoint: start")
    engine.save(partial)
    torch.save(rng_state(), partial / f"rng_rank{world.rank}.pt")
    if world.is_main:
        torch.save({"step": step, **trainer_state}, partial / "trainer_state.pt")
    barrier(world, "checkpoint: written")
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    barrier(world, "checkpoint: committed")
    return final


def load_checkpoint(path: str | Path, engine: Engine, world: World) -> dict:
    """Restore the engine and this rank's RNG; return the trainer state (step, loader, ...)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder '{path}' does not exist")
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"checkpoint '{path}' is incomplete: 'trainer_state.pt' is missing")
    try:
        engine.load(path)
    except pickle.UnpicklingError as error:  # an engine's own torch.load(weights_only=True) refused
        raise CheckpointRefusedError(path, f"a file of its engine state is not plain tensor data "
                                           f"({str(error).strip().splitlines()[0]})") from None
    rng_path = path / f"rng_rank{world.rank}.pt"
    if rng_path.is_file():  # a checkpoint from a smaller world has no RNG state for this rank
        set_rng_state(load_pt(rng_path))
    return load_pt(path / "trainer_state.pt")


def read_weights(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """Full model (or EMA) tensors of a checkpoint, in one process, whatever world size wrote it."""
    if (Path(path) / "deepspeed").is_dir():
        return _read_deepspeed_weights(Path(path), ema)
    if (Path(path) / "megatron").is_dir():
        from ddrl_scale.parallel.megatron_engine import read_megatron_weights

        return read_megatron_weights(Path(path), ema)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    engine_dir = Path(path) / "engine"
    if not (engine_dir / ".metadata").is_file():
        raise FileNotFoundError(f"checkpoint '{path}' has no engine state (engine/.metadata)")
    prefix = "ema." if ema else "model."
    metadata = read_dcp_metadata(engine_dir)
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not state:
        raise KeyError(f"checkpoint '{path}' holds no {'EMA' if ema else 'model'} weights")
    with warnings.catch_warnings():  # single-process load is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_load(state, engine_dir, no_dist=True)
    return {key[len(prefix):]: tensor for key, tensor in state.items()}


def _read_deepspeed_weights(path: Path, ema: bool) -> dict[str, torch.Tensor]:
    """Consolidate a DeepSpeed ZeRO checkpoint (fp32 master weights, or the per-rank EMA files)."""
    if not ema:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from ddrl_scale.parallel.deepspeed_engine import TAG

        with deepspeed_weights_only():  # zero_to_fp32 itself reads with weights_only=False
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(path / "deepspeed"), tag=TAG))
    files = sorted(path.glob("ema_rank*.pt"), key=lambda f: int(f.stem[len("ema_rank"):]))
    if not files:
        raise KeyError(f"checkpoint '{path}' holds no EMA weights")
    parts = [load_pt(f) for f in files]
    if not parts[0]["zero3"]:
        return parts[0]["tensors"]  # ZeRO-2: every rank holds the whole EMA
    if len(parts) != parts[0]["world_size"]:
        raise FileNotFoundError(f"checkpoint '{path}': {len(parts)} EMA partitions of "
                                f"{parts[0]['world_size']}")
    out = {}
    for name, shape in parts[0]["shapes"].items():
        flat = torch.cat([part["tensors"][name].reshape(-1) for part in parts])
        numel = 1
        for size in shape:
            numel *= size
        out[name] = flat[:numel].view(shape).clone()
    return out
