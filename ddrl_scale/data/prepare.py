"""`ddrl data prepare`: videos with captions -> latent shards + index, in parallel and resumable.

Place in the data flow (docs/architecture.md): offline, before training. It makes the anchor
shards that the sharded loader (`data/sharded.py`) streams into the DDRL data term.

Inputs (`input`):
  * a folder of video files (`.mp4`, `.webm`, `.mkv`, `.mov`, `.avi`, searched recursively), each
    with its caption beside it: `clip.txt`, or `clip.json` with a "caption" (or "text") field;
  * tar shards in the layout video2dataset writes (`{key}.mp4`, `{key}.txt`, `{key}.json`): a folder
    of `.tar`, a glob, a brace pattern or URLs (`pipe:`, http) as `data/shards.resolve_shards` takes.

Work units: one output shard per unit. A folder's sorted video list is cut into units of
`samples_per_shard` videos; each input tar is one unit. Unit `i` becomes `part-{i:06d}.tar`.

Output folder layout (`out`):
    part-000000.tar ...           latent shards (format: `latent_shards.py`)
    index/part-000000.json        per-shard sidecar: samples (key, shape, dtype, checksum, source) and
                                  the skipped inputs with the reason; its presence marks the unit done
    index.json                    the merged index, written once every unit is done
    .prepare/plan.json            settings and the unit list, shared by all tasks of the job

Parallelism: SLURM array task `t` of `n` (`--task-index/--num-tasks`, else SLURM_ARRAY_TASK_ID /
SLURM_ARRAY_TASK_COUNT) takes the units `i` with `i % n == t`; inside a task `--workers` processes
take units from a pool. Resume: a unit whose sidecar exists with the job's settings fingerprint and
whose shard file has the recorded size and SHA-256 is not redone; a shard is written under
`.partial` and renamed, the sidecar after it, so a killed task leaves no half-done unit behind. The
task that finds every unit done writes `index.json` (so the last task of an array writes it; rerun
`prepare` on the same folder to (re)write it by hand).

Bad inputs (empty, undecodable or too short videos, missing captions, truncated tar members) are
skipped, listed with their source and reason in the sidecar and in the task's summary, and counted;
they never stop the job. A unit none of whose inputs gives a sample writes its sidecar (the skipped
list) but no shard file, and the index does not list it: no empty shard reaches the loader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddrl_scale.data import latent_shards as fmt
from ddrl_scale.data.encoders import build_text_encoder, build_vae
from ddrl_scale.data.video_io import VIDEO_EXTENSIONS, VideoDecodeError, decode_video

logger = logging.getLogger(__name__)

PLAN_PATH = ".prepare/plan.json"
CAPTION_FIELDS = ("caption", "text")


class PrepareError(ValueError):
    """A prepare job cannot run as asked (bad settings, inputs or output folder); the message says why."""


@dataclass
class PrepareSettings:
    """What the latents are: every field except `batch_size` and `device` is part of the fingerprint
    that resume checks (a folder holds one consistent set of shards)."""

    num_frames: int = 8
    height: int = 16
    width: int = 16
    frame_stride: int = 1
    vae: str = "pixel"
    text_encoder: str = "none"
    dtype: str = "fp16"
    latent_format: str = "safetensors"
    samples_per_shard: int = 256
    batch_size: int = 8  # videos per VAE call
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("num_frames", "height", "width", "frame_stride", "samples_per_shard", "batch_size"):
            if getattr(self, name) < 1:
                raise PrepareError(f"prepare: {name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in fmt.DTYPES:
            raise PrepareError(f"prepare: dtype must be one of {sorted(fmt.DTYPES)}, got {self.dtype!r}")
        if self.latent_format not in fmt.LATENT_FORMATS:
            raise PrepareError(f"prepare: latent_format must be one of {fmt.LATENT_FORMATS}, "
                               f"got {self.latent_format!r}")
        if self.latent_format == "npy" and self.dtype != "fp16":
            raise PrepareError("prepare: latent_format=npy stores fp16 only; use dtype=fp16 or "
                               "latent_format=safetensors")

    def params(self) -> dict:
        values = asdict(self)
        values.pop("batch_size"), values.pop("device")
        return values


@dataclass
class Unit:
    name: str  # output shard file name
    sources: list[str]  # video paths relative to the input folder, or one input tar URL


@dataclass
class Plan:
    kind: str  # files | tars
    input: str
    units: list[Unit]
    params: dict

    def fingerprint(self) -> str:
        text = json.dumps({"kind": self.kind, "params": self.params,
                           "units": [[unit.name, unit.sources] for unit in self.units]}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"kind": self.kind, "input": self.input, "params": self.params,
                "fingerprint": self.fingerprint(),
                "units": [[unit.name, unit.sources] for unit in self.units]}


@dataclass
class PrepareSummary:
    units_total: int
    units_in_task: int
    units_already_done: int
    units_written: int
    samples_written: int
    inputs_skipped: int
    index_path: Path | None
    seconds: float
    skipped: list[dict] = field(default_factory=list)
    # the whole index's counts once it is written (a rerun writes nothing, but the index has them)
    index_totals: dict[str, int] | None = None


# -- planning --------------------------------------------------------------------------------------
def make_plan(input_spec: str, settings: PrepareSettings) -> Plan:
    """The job's units, from the sorted input listing: the same on every task."""
    from ddrl_scale.data.shards import resolve_shards

    path = Path(input_spec)
    _check_input(input_spec, path)
    if path.is_dir():
        videos = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                        if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        if videos:
            per = settings.samples_per_shard
            units = [Unit(f"part-{i // per:06d}.tar", videos[i:i + per]) for i in range(0, len(videos), per)]
            return Plan("files", str(path.resolve()), units, settings.params())
        if not any(path.glob("*.tar")):
            raise FileNotFoundError(f"prepare: input folder '{input_spec}' holds no video files "
                                    f"({', '.join(VIDEO_EXTENSIONS)}) and no .tar shards")
    try:
        tars = resolve_shards(input_spec)
    except FileNotFoundError as error:  # its words are about data.shards; here the shards are the input
        raise FileNotFoundError(f"prepare: input {str(error).removeprefix('data.shards: ')}") from None
    units = [Unit(f"part-{i:06d}.tar", [url]) for i, url in enumerate(tars)]
    return Plan("tars", input_spec, units, settings.params())


def _check_input(input_spec: str, path: Path) -> None:
    """A local input that is not there, or one video file, named as the input (not as shards)."""
    pattern = any(char in input_spec for char in "*?[{")
    if fmt.is_local(input_spec) and not pattern and not path.exists():
        raise FileNotFoundError(f"prepare: input '{input_spec}' does not exist (expected a folder of "
                                "videos with captions, or video2dataset .tar shards)")
    if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
        raise PrepareError(f"prepare: input '{input_spec}' is one video file: put the videos and their "
                           "captions (.txt or .json beside each) in a folder and pass the folder")


def task_from_env(task_index: int | None, num_tasks: int | None) -> tuple[int, int]:
    """(task index, task count): the arguments, else the SLURM array variables, else (0, 1)."""
    if task_index is None and num_tasks is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))  # arrays may start at 1
        task_index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - first
        num_tasks = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    task_index, num_tasks = task_index or 0, num_tasks or 1
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise PrepareError(f"prepare: task index {task_index} is not in [0, {num_tasks})")
    return task_index, num_tasks


def _write_or_check_plan(out: Path, plan: Plan) -> None:
    plan_path = out / PLAN_PATH
    if plan_path.is_file():
        existing = json.loads(plan_path.read_text())
        if existing.get("fingerprint") != plan.fingerprint():
            changed = [key for key in plan.params if existing.get("params", {}).get(key) != plan.params[key]]
            what = f"settings {changed}" if changed else "input files"
            raise PrepareError(f"prepare: output folder '{out}' was prepared with different {what} "
                               f"(plan {existing.get('fingerprint')} vs {plan.fingerprint()}); use a new "
                               "output folder or --overwrite")
        return
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    fmt.write_json_atomic(plan_path, plan.to_json())


def clear_output(out: Path) -> None:
    """Remove what an earlier prepare wrote into `out` (only its own files)."""
    for name in (fmt.INDEX_NAME,):
        (out / name).unlink(missing_ok=True)
    for folder in (out / ".prepare", out / fmt.SIDECAR_DIR):
        if folder.is_dir():
            shutil.rmtree(folder)
    for shard in out.glob("part-*.tar*"):
        shard.unlink()


# -- one unit --------------------------------------------------------------------------------------
@dataclass
class _Input:
    key: str
    source: str
    video: str | bytes | None  # path or file bytes; None when the input is already known bad
    caption: str | None
    meta: dict
    error: str | None = None
    member: str = ""  # the video's tar member name (tar inputs), named in its decode error


def _safe_key(text: str) -> str:
    """A tar-safe sample key: no dots (they separate the key from the suffix), no folders."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text) or "sample"


def _caption_from_json(data: bytes | str) -> tuple[str | None, dict]:
    try:
        meta = json.loads(data)
    except json.JSONDecodeError:
        return None, {}
    if not isinstance(meta, dict):
        return None, {}
    caption = next((meta[name] for name in CAPTION_FIELDS if isinstance(meta.get(name), str)), None)
    return caption, meta


def _file_inputs(root: Path, sources: list[str]) -> Iterator[_Input]:
    for relative in sources:
        path = root / relative
        caption, meta = None, {}
        if path.with_suffix(".json").is_file():
            caption, meta = _caption_from_json(path.with_suffix(".json").read_bytes())
        if path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()
        key = _safe_key(relative.rsplit(".", 1)[0])
        yield _Input(key, relative, str(path), caption, meta,
                     None if caption else "no caption (.txt or .json with a 'caption' field)")


def _tar_inputs(url: str) -> Iterator[_Input]:
    for raw in fmt.iter_shard(url):
        source = f"{url}:{raw.key}"
        if raw.error:
            yield _Input(_safe_key(raw.key), source, None, None, {}, raw.error)
            continue
        video_suffix = next((s for s in raw.members if "." + s.lower() in VIDEO_EXTENSIONS), None)
        caption, meta = _caption_from_json(raw.members["json"]) if "json" in raw.members else (None, {})
        if "txt" in raw.members:
            caption = raw.members["txt"].decode("utf-8", errors="replace").strip()
        error = None if video_suffix else f"no video member (found {sorted(raw.members)})"
        error = error or (None if caption else "no caption (.txt or .json 'caption')")
        yield _Input(_safe_key(raw.key), source, raw.members.get(video_suffix) if video_suffix else None,
                     caption, meta, error, f"{raw.key}.{video_suffix}" if video_suffix else "")


_ENCODERS: dict[tuple, tuple] = {}  # per process: built once, used for every unit the process takes


def _encoders(settings: PrepareSettings) -> tuple:
    cache_key = (settings.vae, settings.text_encoder, settings.device)
    if cache_key not in _ENCODERS:
        _ENCODERS[cache_key] = (build_vae(settings.vae, settings.device),
                                build_text_encoder(settings.text_encoder, settings.device))
    return _ENCODERS[cache_key]


def _encode_batch(batch: list[tuple[_Input, object]],
                  settings: PrepareSettings) -> list[tuple[dict[str, bytes], list[int]]]:
    """Decoded videos -> per video (tensor members, latent shape (C, T, H, W))."""
    vae, text_encoder = _encoders(settings)
    videos = torch.from_numpy(np.stack([decoded.frames for _, decoded in batch]))
    videos = videos.permute(0, 4, 1, 2, 3).float().div(255.0)  # (B, 3, T, H, W) in [0, 1]
    with torch.no_grad():
        latents = vae.encode(videos).float().cpu().to(fmt.DTYPES[settings.dtype])
        texts = (text_encoder.encode([item.caption for item, _ in batch]).to(fmt.DTYPES[settings.dtype])
                 if text_encoder is not None else None)
    return [(fmt.encode_latents(latents[i], None if texts is None else texts[i], settings.latent_format),
             list(latents.shape[1:])) for i in range(len(batch))]


def process_unit(out: Path, plan_kind: str, root: str, unit: Unit, settings: PrepareSettings,
                 fingerprint: str) -> dict:
    """Write one unit's shard and then its sidecar; return the sidecar."""
    inputs = _file_inputs(Path(root), unit.sources) if plan_kind == "files" else _tar_inputs(unit.sources[0])
    shard_path, samples, skipped, used_keys = out / unit.name, [], [], set()
    partial = shard_path.with_name(shard_path.name + ".partial")

    def flush(tar: tarfile.TarFile, batch: list) -> None:
        for (item, decoded), (members, shape) in zip(batch, _encode_batch(batch, settings)):
            name = fmt.tensor_member(members)
            meta = {**item.meta, "source": item.source, "source_size": list(decoded.source_size),
                    "source_fps": decoded.source_fps, "frame_indices": decoded.frame_indices}
            fmt.add_sample(tar, item.key, {**members, "txt": item.caption.encode("utf-8"),
                                           "json": json.dumps(meta).encode()})
            samples.append({"key": item.key, "shape": shape, "dtype": settings.dtype, "member": name,
                            "sha256": fmt.sha256_bytes(members[name]), "bytes": len(members[name]),
                            "source": item.source})
        batch.clear()

    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
        batch: list = []
        for item in inputs:
            if item.error is None:
                try:
                    decoded = decode_video(item.video, settings.num_frames, settings.height,
                                           settings.width, settings.frame_stride)
                except VideoDecodeError as error:
                    item.error = f"member '{item.member}': {error}" if item.member else str(error)
            if item.error is not None:
                # the task's summary lists it (once); the log has it only at debug level
                logger.debug("prepare: skipping input '%s': %s", item.source, item.error)
                skipped.append({"source": item.source, "reason": item.error})
                continue
            key, suffix = item.key, 1
            while item.key in used_keys:  # two sources that sanitise to one key
                item.key, suffix = f"{key}-{suffix}", suffix + 1
            used_keys.add(item.key)
            batch.append((item, decoded))
            if len(batch) >= settings.batch_size:
                flush(tar, batch)
        if batch:
            flush(tar, batch)
    if samples:
        partial.replace(shard_path)
        size, digest = shard_path.stat().st_size, fmt.sha256_file(shard_path)
    else:  # every input was bad: the sidecar keeps their reasons, no empty shard is left behind
        partial.unlink()
        shard_path.unlink(missing_ok=True)
        size, digest = 0, None
    sidecar = {"name": unit.name, "num_samples": len(samples), "bytes": size, "sha256": digest,
               "fingerprint": fingerprint, "samples": samples, "skipped": skipped}
    sidecar_path = out / fmt.SIDECAR_DIR / (Path(unit.name).stem + ".json")
    sidecar_path.parent.mkdir(parents=True, exist_ok=True)
    fmt.write_json_atomic(sidecar_path, sidecar)
    logger.info("prepare: %s: %d samples, %d inputs skipped%s", unit.name, len(samples), len(skipped),
                "" if samples else " (no shard written)")
    return sidecar


def unit_done(out: Path, unit: Unit, fingerprint: str, verify: bool = True) -> dict | None:
    """The unit's sidecar when the unit is complete (and, with `verify`, its shard checksum holds)."""
    sidecar_path = out / fmt.SIDECAR_DIR / (Path(unit.name).stem + ".json")
    shard_path = out / unit.name
    if not sidecar_path.is_file():
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError:
        return None
    if sidecar.get("sha256") is None:  # a unit without samples: done if its settings hold
        return sidecar if sidecar.get("fingerprint") == fingerprint else None
    if not shard_path.is_file():
        return None
    if sidecar.get("fingerprint") != fingerprint or sidecar.get("bytes") != shard_path.stat().st_size:
        return None
    if verify and sidecar.get("sha256") != fmt.sha256_file(shard_path):
        logger.warning("prepare: shard '%s' does not match its recorded checksum: redoing it", shard_path)
        return None
    return sidecar


def _worker_init() -> None:
    torch.set_num_threads(1)  # the processes share the cores; one thread each avoids oversubscription


def _run_unit(job: tuple) -> dict:
    out, kind, root, unit, settings, fingerprint = job
    return process_unit(out, kind, root, unit, settings, fingerprint)


# -- the index -------------------------------------------------------------------------------------
def merge_index(out: Path, plan: Plan) -> Path | None:
    """Write `out/index.json` from the sidecars when every unit is done; None (nothing written) if not."""
    sidecars = []
    for unit in plan.units:
        sidecar_path = out / fmt.SIDECAR_DIR / (Path(unit.name).stem + ".json")
        if not sidecar_path.is_file():
            return None
        sidecars.append(json.loads(sidecar_path.read_text()))
    return fmt.write_index(out, sidecars, plan.params,
                           {"input": plan.input, "fingerprint": plan.fingerprint()})


# -- the job ---------------------------------------------------------------------------------------
def prepare(input_spec: str, out: str | Path, settings: PrepareSettings, workers: int = 1,
            task_index: int | None = None, num_tasks: int | None = None, overwrite: bool = False,
            verify_existing: bool = True) -> PrepareSummary:
    """Run this task's share of the prepare job (see the module docstring); resumable."""
    start = time.perf_counter()
    if workers < 1:
        raise PrepareError(f"prepare: workers must be >= 1, got {workers}")
    task_index, num_tasks = task_from_env(task_index, num_tasks)
    out = Path(out)
    plan = make_plan(input_spec, settings)
    if overwrite and task_index == 0 and out.is_dir():
        clear_output(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_or_check_plan(out, plan)
    fingerprint = plan.fingerprint()
    mine = [unit for position, unit in enumerate(plan.units) if position % num_tasks == task_index]
    done = {unit.name: unit_done(out, unit, fingerprint, verify_existing) for unit in mine}
    todo = [unit for unit in mine if done[unit.name] is None]
    logger.info("prepare: task %d/%d: %d units, %d already done, %d to write", task_index, num_tasks,
                len(mine), len(mine) - len(todo), len(todo))
    root = plan.input if plan.kind == "files" else ""
    jobs = [(out, plan.kind, root, unit, settings, fingerprint) for unit in todo]
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with context.Pool(min(workers, len(jobs)), initializer=_worker_init) as pool:
            written = list(pool.imap_unordered(_run_unit, jobs))
    else:
        written = [_run_unit(job) for job in jobs]
    skipped = [entry for sidecar in written for entry in sidecar["skipped"]]
    index_path = merge_index(out, plan)
    totals = None
    if index_path is None:
        logger.info("prepare: index not written yet: other tasks' units are not all done")
    else:
        index = json.loads(index_path.read_text())
        totals = {name: int(index.get(name, 0)) for name in ("num_samples", "num_shards", "num_skipped")}
    return PrepareSummary(len(plan.units), len(mine), len(mine) - len(todo), len(written),
                          sum(sidecar["num_samples"] for sidecar in written), len(skipped), index_path,
                          time.perf_counter() - start, skipped, totals)
