"""Checks of a run's files and sizes that cost milliseconds, made before the expensive part.

Place in the data flow (docs/architecture.md): `Trainer.__init__` calls `check_before_build` right
after `config.schema.check_run_plan`, before the text encoder, the VAE, the model, the engine or the
loader exist. Each check reads only small files (the shards' index.json, folder listings) and fails
with a `ConfigError` naming the key, what was found and what to change (the CLI prints that one
line, exit status 2), instead of a traceback after model load and a full rollout:

- `data.shards` prepared at another size than the run's `video.*` (their index.json records every
  shard's latent shapes), or outside `data.buckets`;
- `train.resume=PATH` that is not a checkpoint folder (a run folder or `checkpoints/` is named with
  its latest checkpoint);
- files the run reads that are not there: `model.init_checkpoint`, `model.pretrained`, and every
  reward argument naming a local path (`path`, `*_path`, `*_dir`, `*_file`, `*_folder`);
- with `run.device=cuda`, more processes on this node (torchrun's LOCAL_WORLD_SIZE) than GPUs it
  sees, said by every rank of the node alike (`train/host_checks.py` names the first rank without
  a GPU; the parallel plan against the world size is `check_run_plan`'s).
"""

from __future__ import annotations

import os
from pathlib import Path

from ddrl_scale.config import ConfigError, RunConfig
from ddrl_scale.data import latent_shards as fmt

PATH_ARG_SUFFIXES = ("_path", "_dir", "_file", "_folder")


def check_before_build(config: RunConfig) -> None:
    """Every check of this module; raises ConfigError for the first problem found."""
    check_anchor_shards(config)
    check_resume(config)
    check_input_paths(config)
    check_node_gpus(config)


# -- anchor shards against video.* ------------------------------------------------------------------
def run_latent_shape(config: RunConfig) -> tuple[int, int, int, int]:
    video = config.video
    return video.channels, video.num_frames, video.height, video.width


def index_shapes(index: dict, shard_names: set[str] | None = None) -> dict[tuple[int, ...], int]:
    """Latent shape -> samples, summed over the index's shards (those named, when given)."""
    shapes: dict[tuple[int, ...], int] = {}
    for entry in index["shards"]:
        if shard_names is not None and entry["name"] not in shard_names:
            continue
        for name, count in entry.get("shapes", {}).items():
            shape = tuple(int(size) for size in name.split("x"))
            shapes[shape] = shapes.get(shape, 0) + int(count)
    return shapes


def prepare_flags_for(params: dict, stored: tuple[int, ...], wanted: tuple[int, ...]) -> str | None:
    """`--num-frames F --height H --width W` that make the index's VAE give `wanted` latents, from
    the compression its own (pixels, latents) pair shows; None when that cannot be told (another
    channel count needs another VAE; sizes without a whole compression factor)."""
    try:
        frames, height, width = int(params["num_frames"]), int(params["height"]), int(params["width"])
    except (KeyError, TypeError, ValueError):
        return None
    if stored[0] != wanted[0] or height % stored[2] or width % stored[3]:
        return None
    if stored[1] == frames:
        new_frames = wanted[1]
    elif stored[1] > 1 and (frames - 1) % (stored[1] - 1) == 0:  # a causal VAE: 1 + k (T - 1) frames
        new_frames = 1 + (frames - 1) // (stored[1] - 1) * (wanted[1] - 1)
    else:
        return None
    return (f"--num-frames {new_frames} --height {height // stored[2] * wanted[2]} "
            f"--width {width // stored[3] * wanted[3]}")


def check_anchor_shards(config: RunConfig) -> None:
    """The shapes that `data.shards`' index records against `video.*` (or `data.buckets`)."""
    data = config.data
    if not data.shards:
        return  # the generated demo shards are made at the run's video size
    from ddrl_scale.data.shards import resolve_shards

    urls = resolve_shards(data.shards)
    index_url = data.index or fmt.index_url_beside(urls)
    if not index_url:
        return  # no prepared index (demo-format or hand-made shards): the loader checks each sample
    try:
        index = fmt.load_index(index_url)
    except (OSError, fmt.ShardFormatError) as error:
        raise ConfigError(f"{'data.index' if data.index else 'data.shards'}: {error}") from None
    names = {url.rstrip("/").rsplit("/", 1)[-1] for url in urls}
    missing = sorted(names - {entry["name"] for entry in index["shards"]})
    if missing:
        raise ConfigError(f"data.shards: shard '{missing[0]}' is not listed in the index '{index_url}' "
                          f"({len(missing)} shards are not): pass the prepared folder, or its index as "
                          "data.index")
    shapes = index_shapes(index, names)
    wanted = run_latent_shape(config)
    allowed = {tuple(shape) for shape in data.buckets} or {wanted}
    wrong = {shape: count for shape, count in shapes.items() if shape not in allowed}
    if wrong:
        raise ConfigError(_mismatch_message(config, index, wrong, sum(shapes.values()), wanted))


def _mismatch_message(config: RunConfig, index: dict, wrong: dict, total: int,
                      wanted: tuple[int, ...]) -> str:
    params = index.get("params", {})
    found = ", ".join(f"{fmt.shape_name(shape)} in {count} of {total} samples"
                      for shape, count in sorted(wrong.items(), key=lambda item: -item[1])[:3])
    prepared = " ".join(f"--{flag} {params[key]}" for flag, key in (
        ("num-frames", "num_frames"), ("height", "height"), ("width", "width"), ("vae", "vae"))
        if key in params)
    stored = max(wrong, key=wrong.get)
    video = config.video
    if config.data.buckets:
        return (f"data.shards '{config.data.shards}' hold latents of shape {found}, outside "
                f"data.buckets {config.data.buckets}: add the shape to data.buckets, or prepare the "
                f"shards again at a bucket's size (they were prepared with {prepared or 'unknown settings'})")
    fix = (f"set video.channels={stored[0]} video.num_frames={stored[1]} video.height={stored[2]} "
           f"video.width={stored[3]} to train at the shards' size")
    flags = prepare_flags_for(params, stored, wanted)
    again = (f"prepare them again with {flags}" if flags else
             f"prepare them again with a VAE and size whose latents are {fmt.shape_name(wanted)}")
    return (f"data.shards '{config.data.shards}' hold latents of shape {found} (prepared with "
            f"{prepared or 'unknown settings'}), but video.* asks for {fmt.shape_name(wanted)} "
            f"(video.channels={video.channels}, video.num_frames={video.num_frames}, "
            f"video.height={video.height}, video.width={video.width}): {fix}, or {again}")


# -- the checkpoint to resume ---------------------------------------------------------------------
def check_resume(config: RunConfig) -> None:
    """train.resume=PATH must be one checkpoint folder (it holds trainer_state.pt)."""
    setting = config.train.resume
    if setting in ("auto", "none"):
        return
    from ddrl_scale.train.checkpoint import complete_checkpoints

    path = Path(setting)
    if not path.is_dir():
        raise ConfigError(f"train.resume: checkpoint folder '{setting}' does not exist "
                          "(train.resume=auto resumes from the latest one in run.output_dir)")
    if (path / "trainer_state.pt").is_file():
        return
    run_dir = path.parent if path.name == "checkpoints" else path
    found = complete_checkpoints(run_dir)
    hint = (f"its latest checkpoint is '{found[-1]}': pass that, or train.resume=auto with "
            f"run.output_dir={run_dir}" if found else
            "expected a checkpoints/step_NNNNNN folder of a run, holding trainer_state.pt")
    raise ConfigError(f"train.resume: '{setting}' is not a checkpoint folder (no trainer_state.pt); {hint}")


# -- files the run reads ----------------------------------------------------------------------------
def _is_path_arg(key: str) -> bool:
    return key == "path" or key.endswith(PATH_ARG_SUFFIXES)


def check_input_paths(config: RunConfig) -> None:
    """Local files and folders the config names exist: the starting weights and reward models."""
    model = config.model
    init = model.init_checkpoint
    if model.kind == "dit" and init.lower() not in ("", "none") and not init.startswith("builtin:") \
            and not Path(init).is_file():
        raise ConfigError(f"model.init_checkpoint: '{init}' does not exist (a .safetensors file, "
                          "builtin:base or none)")
    if model.kind == "diffusers_wan" and not Path(model.pretrained).is_dir():
        raise ConfigError(f"model.pretrained: '{model.pretrained}' is not a folder (a local diffusers "
                          "Wan pipeline folder with transformer/; nothing is downloaded at run time)")
    for position, reward in enumerate(config.rewards):
        for key, value in reward.args.items():
            if not (_is_path_arg(key) and isinstance(value, str) and value and fmt.is_local(value)):
                continue
            if not Path(value).exists():
                raise ConfigError(f"rewards.{position}.args.{key}: '{value}' does not exist (the "
                                  f"{reward.name} reward's model files must be on this host before "
                                  "the run starts)")


# -- processes against GPUs -------------------------------------------------------------------------
def check_node_gpus(config: RunConfig) -> None:
    """run.device=cuda: the node's processes (LOCAL_WORLD_SIZE, set by torchrun) each need a GPU."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if config.run.device != "cuda" or not (local or "").isdigit():
        return
    import torch

    visible = torch.cuda.device_count()  # no CUDA context is made for the count
    if visible and int(local) > visible:
        raise ConfigError(f"run.device=cuda: this node starts {local} processes (torchrun "
                          f"--nproc_per_node) but sees {visible} GPUs: start at most {visible} per node "
                          "(launch.nproc_per_node, --nproc), or make more GPUs visible")
