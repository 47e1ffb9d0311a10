"""`ddrl ckpt export`: a (possibly sharded) checkpoint's policy, or its EMA, as files other tools read.

Formats (`--format`):
    safetensors  one file. Built-in DiT: the DiT config in the metadata, so `model.init_checkpoint=FILE`
                 starts a new run from it. diffusers_wan: the transformer's tensors under diffusers'
                 names, with the policy config ("dit_config") and the diffusers config ("config") in
                 the metadata; `model.init_checkpoint=FILE` (with the same model.pretrained) loads it.
    diffusers    diffusers_wan only: a folder OUT/transformer/ (config.json and
                 diffusion_pytorch_model.safetensors) that `WanTransformer3DModel.from_pretrained(OUT,
                 subfolder="transformer")` loads and `model.pretrained=OUT` trains from, plus
                 OUT/ddrl_export.json (where it came from). The built-in DiT has no diffusers class.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ddrl_scale.models import policy_from_dict, save_weights
from ddrl_scale.storage.safe_load import load_pt
from ddrl_scale.train.checkpoint import latest_checkpoint, read_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = ("safetensors", "diffusers")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest complete checkpoint)."""
    path = Path(path)
    if (path / "trainer_state.pt").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"'{path}' is neither a checkpoint folder nor a run folder with one")
    return latest


def load_policy(checkpoint: str | Path, ema: bool = False) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's policy (model or EMA weights) rebuilt from its recorded config, and the
    trainer state (step, ...)."""
    checkpoint = resolve_checkpoint(checkpoint)
    state = load_pt(checkpoint / "trainer_state.pt")
    if "dit_config" not in state:
        raise KeyError(f"checkpoint '{checkpoint}': trainer_state.pt records no model config ('dit_config')")
    model = policy_from_dict(json.loads(state["dit_config"]))
    model.load_state_dict(read_weights(checkpoint, ema=ema))
    return model, state


def export_checkpoint(path: str | Path, out: str | Path, ema: bool = False, dtype: str = "fp32",
                      format: str = "safetensors") -> Path:
    """Write the policy of `path` (checkpoint or run folder) to `out` in `format`; returns `out`."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {format!r}")
    checkpoint = resolve_checkpoint(path)
    model, state = load_policy(checkpoint, ema)
    model.to(DTYPES[dtype])
    extra = {"exported_from": str(checkpoint), "ema": ema, "step": int(state["step"])}
    if getattr(model.config, "kind", "dit") != "diffusers_wan":
        if format == "diffusers":
            raise ValueError("--format diffusers: the built-in DiT (model.kind=dit) has no diffusers "
                             "model class; export it with --format safetensors")
        return save_weights(model, out, extra=extra)
    if format == "diffusers":
        return save_wan_diffusers(model, out, extra)
    return save_wan_safetensors(model, out, extra)


def save_wan_diffusers(model, out: str | Path, extra: dict) -> Path:
    """OUT/transformer/ in diffusers' layout (safetensors) and OUT/ddrl_export.json."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out '{out}' is a file; --format diffusers writes a folder")
    out.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(str(out / "transformer"), safe_serialization=True)
    record = {**extra, "policy_config": model.config.to_dict()}
    (out / "ddrl_export.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def save_wan_safetensors(model, out: str | Path, extra: dict) -> Path:
    """One safetensors file: the transformer's tensors (diffusers names), configs in the metadata."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"dit_config": json.dumps(model.config.to_dict()),
                "config": json.dumps({"_class_name": type(model.transformer).__name__,
                                      **model.config.transformer})}
    metadata.update({key: json.dumps(value) for key, value in extra.items()})
    save_file(model.export_state_dict(), str(out), metadata=metadata)
    return out
