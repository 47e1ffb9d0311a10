"""Latent shard format: tar members of one sample, reading them without pickle, and the index files.

Place in the data flow (docs/architecture.md): `ddrl data prepare` writes these shards, the sharded
anchor loader (`data/sharded.py`) and `ddrl data validate` read them.

One sample is a run of consecutive tar members sharing a key (the name up to the first dot of its
base name, as webdataset groups them):

    {key}.latents.safetensors   tensors "latents" (C, T, H, W) fp16|bf16 and, optionally, "text"
                                (L, D): the caption's precomputed text-encoder embeddings
    {key}.latents.npy           (instead of the safetensors) fp16 latents; `{key}.text.npy` beside
    {key}.txt                   caption, UTF-8
    {key}.json                  metadata: source file, source size and fps, frames taken, ...

The demo shards of `data/shards.py` (`{key}.video.npy`: uint8 (T, H, W, 3) pixels or float16
latents) are read by the same code. Nothing here unpickles: `.npy` is read with
`allow_pickle=False`, safetensors and JSON are pickle-free formats.

Index files (written by `prepare.py`, all JSON):

    <root>/index.json                  {"format": "ddrl-anchor-shards", "version": 1,
                                        "params": {...prepare settings...},
                                        "num_samples": N, "num_shards": S, "num_skipped": K,
                                        "shards": [{"name": "part-000000.tar", "num_samples": n,
                                                    "bytes": b, "sha256": "...", "sidecar":
                                                    "index/part-000000.json",
                                                    "shapes": {"3x8x16x16": n}, "dtype": "float16"}]}
    <root>/index/part-000000.json      the shard's sidecar: the same shard fields plus "samples":
                                       [{"key", "shape", "dtype", "member", "sha256", "bytes",
                                         "source"}] in tar order, and "skipped": [{"source",
                                         "reason"}] (inputs that could not be turned into a sample)

The top-level index stays small at any scale (one entry per shard); per-sample detail lives in the
sidecars, which the loader reads for the shard it opens and `validate` checks exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

INDEX_FORMAT = "ddrl-anchor-shards"
INDEX_VERSION = 1
INDEX_NAME = "index.json"
SIDECAR_DIR = "index"

# the member that holds the sample's tensor, by preference; the first one present is used
TENSOR_MEMBERS = ("latents.safetensors", "latents.npy", "video.npy")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LATENT_FORMATS = ("safetensors", "npy")


class ShardFormatError(ValueError):
    """A sample or index file is not in the expected format; the message says what was expected."""


# -- names and checksums ---------------------------------------------------------------------------
def split_member_name(name: str) -> tuple[str, str]:
    """Tar member name -> (sample key, suffix): 'a/b.latents.npy' -> ('a/b', 'latents.npy')."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        raise ShardFormatError(f"tar member '{name}' has no '<key>.<suffix>' form")
    return (f"{folder}/{stem}" if folder else stem), suffix


def sample_member(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, suffix) of a member that belongs to a sample; None for folders, hidden files (macOS tar
    adds `._*` companions) and names outside the `<key>.<suffix>` scheme, which are ignored."""
    base = info.name.rpartition("/")[2]
    if not info.isfile() or base.startswith(".") or "." not in base:
        return None
    return split_member_name(info.name)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def shape_name(shape: tuple[int, ...] | list[int]) -> str:
    """(3, 8, 16, 16) -> '3x8x16x16' (the bucket name used in indexes and stats)."""
    return "x".join(str(int(size)) for size in shape)


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def open_url(url: str):
    """A binary read stream for a local path or any URL form webdataset opens (pipe:, http(s), ...)."""
    if is_local(url):
        return open(url, "rb")
    import webdataset as wds  # only remote reads need it

    return wds.gopen(url, "rb")


def read_json_url(url: str) -> dict:
    with open_url(url) as stream:
        text = stream.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ShardFormatError(f"'{url}' is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ShardFormatError(f"'{url}': expected a JSON object, got {type(value).__name__}")
    return value


def write_json_atomic(path: Path, value: dict) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(value, indent=1) + "\n")
    temporary.replace(path)


# -- encoding one sample ---------------------------------------------------------------------------
def encode_latents(latents: torch.Tensor, text: torch.Tensor | None, latent_format: str) -> dict[str, bytes]:
    """Tensor members of one sample: {'latents.safetensors': ...} or {'latents.npy': ..., 'text.npy'}."""
    if latent_format == "safetensors":
        tensors = {"latents": latents.contiguous()}
        if text is not None:
            tensors["text"] = text.contiguous()
        return {"latents.safetensors": save_safetensors(tensors)}
    if latent_format == "npy":
        if latents.dtype != torch.float16:
            raise ShardFormatError(f"latent_format=npy stores fp16 only (numpy has no {latents.dtype}); "
                                   "use latent_format=safetensors")
        members = {"latents.npy": _npy_bytes(latents.numpy())}
        if text is not None:
            members["text.npy"] = _npy_bytes(text.to(torch.float16).numpy())
        return members
    raise ShardFormatError(f"latent_format: expected one of {LATENT_FORMATS}, got {latent_format!r}")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A member header with fixed owner and time, so a rewritten shard has the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uname = info.gname = ""
    return info


def add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    if "." in key.rpartition("/")[2]:
        raise ShardFormatError(f"sample key '{key}' contains a dot: it would split the sample")
    for suffix in sorted(members):
        data = members[suffix]
        tar.addfile(tar_info(f"{key}.{suffix}", len(data)), io.BytesIO(data))


# -- decoding one sample ---------------------------------------------------------------------------
@dataclass
class Sample:
    """A decoded sample. `tensor` is latents (C, T, H, W) as stored (fp16/bf16/fp32), or, for the
    demo's pixel shards, uint8 pixels (3, T, H, W) that the loader's `encode` turns into latents."""

    key: str
    tensor: torch.Tensor
    is_pixels: bool
    caption: str
    text: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)


def tensor_member(members: dict[str, bytes]) -> str:
    for name in TENSOR_MEMBERS:
        if name in members:
            return name
    raise ShardFormatError(f"no tensor member: expected one of {list(TENSOR_MEMBERS)}, "
                           f"found {sorted(members)}")


def _load_npy(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:  # object arrays (which would need pickle) land here too
        raise ShardFormatError(f"{what}: not a plain .npy array ({error})") from None


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity: the sum of finite fp16/bf16 latents (|x| far below 1e30) is finite, and a
    sum is ~10x faster on CPU than torch.isfinite over half-precision values."""
    accumulate = torch.float64 if tensor.dtype == torch.float32 else torch.float32
    return bool(torch.isfinite(tensor.sum(dtype=accumulate)))


def decode_sample(key: str, members: dict[str, bytes]) -> Sample:
    """Members of one sample -> Sample; any malformed part raises ShardFormatError naming it."""
    name = tensor_member(members)
    text = None
    if name == "latents.safetensors":
        try:
            tensors = load_safetensors(members[name])
        except Exception as error:  # safetensors raises its own error type for a bad header
            raise ShardFormatError(f"{name}: unreadable safetensors ({error})") from None
        if "latents" not in tensors:
            raise ShardFormatError(f"{name}: no tensor named 'latents' (found {sorted(tensors)})")
        tensor, text = tensors["latents"], tensors.get("text")
        is_pixels = False
    else:
        array = _load_npy(members[name], name)
        if "text.npy" in members:
            text = torch.from_numpy(_load_npy(members["text.npy"], "text.npy"))
        if array.dtype == np.uint8 and name == "video.npy":
            if array.ndim != 4 or array.shape[-1] != 3:
                raise ShardFormatError(f"{name}: expected uint8 pixels (T, H, W, 3), got {array.shape}")
            tensor, is_pixels = torch.from_numpy(array).permute(3, 0, 1, 2).contiguous(), True
        elif array.dtype in (np.float16, np.float32):
            tensor, is_pixels = torch.from_numpy(array), False
        else:
            raise ShardFormatError(f"{name}: expected float16/float32 latents or uint8 pixels, "
                                   f"got dtype {array.dtype}")
    if tensor.dim() != 4:
        raise ShardFormatError(f"{name}: expected a 4-D (C, T, H, W) tensor, got shape "
                               f"{tuple(tensor.shape)}")
    if not is_pixels and not all_finite(tensor):
        raise ShardFormatError(f"{name}: latents hold NaN or infinite values")
    if "txt" not in members:
        raise ShardFormatError(f"no caption member '{key}.txt'")
    try:
        caption = members["txt"].decode("utf-8")
        meta = json.loads(members["json"]) if "json" in members else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardFormatError(f"caption or metadata unreadable ({error})") from None
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{key}.json: expected a JSON object, got {type(meta).__name__}")
    return Sample(key, tensor, is_pixels, caption, text, meta)


# -- reading a shard -------------------------------------------------------------------------------
@dataclass
class RawSample:
    """One sample's raw members as read from its shard, or the error that stopped the read."""

    index: int  # position in the shard, 0-based
    key: str
    members: dict[str, bytes]
    num_bytes: int
    error: str | None = None


def iter_shard(url: str, start: int = 0, stop: int | None = None) -> Iterator[RawSample]:
    """Samples `start <= index < stop` of one tar shard, in tar order.

    A local shard is opened seekable, so the samples before `start` are skipped by seeking over their
    data; a remote one (`pipe:`, http, ...) is streamed. A read error (truncated member, corrupt
    header) yields one RawSample with `error` set for the sample being read, then ends: the rest of
    the shard cannot be located. The caller decides what the missing positions become.
    """
    index, key, members, num_bytes = -1, None, {}, 0
    try:
        stream = open_url(url)
    except OSError as error:
        yield RawSample(max(start, 0), "?", {}, 0, f"cannot open shard ({error})")
        return
    try:
        with stream, tarfile.open(fileobj=stream, mode="r:" if is_local(url) else "r|") as tar:
            for info in tar:
                named = sample_member(info)
                if named is None:
                    continue
                member_key, suffix = named
                if member_key != key:
                    if key is not None and index >= start:
                        yield RawSample(index, key, members, num_bytes)
                    index, key, members, num_bytes = index + 1, member_key, {}, 0
                    if stop is not None and index >= stop:
                        return
                if index >= start:
                    reader = tar.extractfile(info)
                    members[suffix] = reader.read() if reader is not None else b""
                    num_bytes += info.size
            if key is not None and index >= start and (stop is None or index < stop):
                yield RawSample(index, key, members, num_bytes)
    except (tarfile.TarError, OSError, EOFError) as error:
        # the key is known only when the error hit a sample being read, not one being skipped
        yield RawSample(max(index, start), key if key is not None and index >= start else "?", {}, num_bytes,
                        f"unreadable tar data ({error})")


# -- index files -----------------------------------------------------------------------------------
@dataclass
class ShardEntry:
    """One shard of an index: where it is, how many samples, and (when loaded) its sidecar's samples."""

    url: str
    num_samples: int
    sidecar_url: str | None = None
    sha256: str | None = None
    num_bytes: int | None = None
    max_tensor_bytes: int | None = None  # an upper bound of one sample's tensor size, when known


def index_url_beside(shards: list[str]) -> str | None:
    """`<folder>/index.json` when every shard is a local file of one folder holding that file."""
    folders = {str(Path(shard).parent) for shard in shards if is_local(shard)}
    if len(folders) != 1 or not all(is_local(shard) for shard in shards):
        return None
    candidate = Path(folders.pop()) / INDEX_NAME
    if not candidate.is_file():
        return None
    try:  # the demo shards keep an index.json of another format beside them
        return str(candidate) if json.loads(candidate.read_text()).get("format") == INDEX_FORMAT else None
    except (json.JSONDecodeError, AttributeError):
        return None


def load_index(url: str) -> dict:
    """Read and check a top-level index.json (format, version, shard entries)."""
    index = read_json_url(url)
    if index.get("format") != INDEX_FORMAT:
        raise ShardFormatError(f"'{url}' is not a {INDEX_FORMAT} index (format={index.get('format')!r})")
    if index.get("version") != INDEX_VERSION:
        raise ShardFormatError(f"'{url}': index version {index.get('version')!r}, this reader knows "
                               f"{INDEX_VERSION}")
    for position, entry in enumerate(index.get("shards", [])):
        for name in ("name", "num_samples"):
            if name not in entry:
                raise ShardFormatError(f"'{url}': shards[{position}] has no '{name}'")
    return index


def join_url(base_url: str, relative: str) -> str:
    """`relative` next to the file `base_url` (a local path or a URL, `pipe:` commands excepted)."""
    if is_local(base_url):
        return str(Path(base_url).parent / relative)
    if base_url.startswith("pipe:"):
        return ""  # a command, not a location: sidecars of piped indexes are not found
    return base_url.rsplit("/", 1)[0] + "/" + relative


def shard_entries(shards: list[str], index_url: str | None) -> list[ShardEntry]:
    """Sample counts of `shards`, from the index when one is known, else by reading tar headers.

    Every shard must be in the index (matched by file name). Without an index a local shard's member
    headers are read (seeking over the data, so this is quick); remote shards need an index.
    """
    if index_url:
        index = load_index(index_url)
        by_name = {entry["name"]: entry for entry in index["shards"]}
        entries = []
        for shard in shards:
            name = shard.rstrip("/").rsplit("/", 1)[-1]
            if name not in by_name:
                raise ShardFormatError(f"shard '{shard}' is not listed in the index '{index_url}'")
            entry = by_name[name]
            sidecar = join_url(index_url, entry["sidecar"]) if entry.get("sidecar") else None
            shapes = [[int(size) for size in name.split("x")] for name in entry.get("shapes", {})]
            element = {"fp16": 2, "bf16": 2}.get(entry.get("dtype") or index["params"].get("dtype"), 4)
            largest = max((math.prod(shape) * element for shape in shapes), default=None)
            entries.append(ShardEntry(shard, int(entry["num_samples"]), sidecar or None,
                                      entry.get("sha256"), entry.get("bytes"), largest))
        return entries
    remote = [shard for shard in shards if not is_local(shard)]
    if remote:
        raise ShardFormatError(f"remote shards (such as '{remote[0]}') need an index file giving their "
                               "sample counts: pass its URL (data.index)")
    entries = []
    for shard in shards:
        count, largest = scan_headers(shard)
        entries.append(ShardEntry(shard, count, max_tensor_bytes=largest))
    return entries


def count_samples(path: str) -> int:
    """Samples in a local tar by its member headers; a shard cut short counts what is there."""
    return scan_headers(path)[0]


def scan_headers(path: str) -> tuple[int, int | None]:
    """(samples, largest tensor member in bytes) of a local tar from its member headers only."""
    keys, last, largest = 0, None, None
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                named = sample_member(info)
                if named is None:
                    continue
                if named[0] != last:
                    keys, last = keys + 1, named[0]
                if named[1] in TENSOR_MEMBERS:
                    largest = max(largest or 0, info.size)
    except (tarfile.TarError, OSError, EOFError):
        pass  # a truncated shard: the samples seen so far (the loader reports the rest as bad)
    return keys, largest


def write_index(out: Path, sidecars: list[dict], params: dict, extra: dict | None = None) -> Path:
    """`out/index.json` from the shards' sidecars (each: name, num_samples, bytes, sha256, samples,
    skipped), in the given order; the sidecars are expected under `out/index/<shard stem>.json`.
    A sidecar of a unit that wrote no shard file (`sha256` None: every input was skipped) is not
    listed; its skipped inputs still count in `num_skipped`."""
    shards = []
    written = [sidecar for sidecar in sidecars if sidecar.get("sha256") is not None]
    empty_skipped = sum(len(sidecar.get("skipped", [])) for sidecar in sidecars
                        if sidecar.get("sha256") is None)
    for sidecar in written:
        shapes: dict[str, int] = {}
        for sample in sidecar["samples"]:
            shapes[shape_name(sample["shape"])] = shapes.get(shape_name(sample["shape"]), 0) + 1
        shards.append({"name": sidecar["name"], "num_samples": sidecar["num_samples"],
                       "bytes": sidecar["bytes"], "sha256": sidecar["sha256"],
                       "sidecar": f"{SIDECAR_DIR}/{Path(sidecar['name']).stem}.json",
                       "shapes": shapes, "dtype": params.get("dtype"),
                       "num_skipped": len(sidecar.get("skipped", []))})
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "params": params, **(extra or {}),
             "num_samples": sum(shard["num_samples"] for shard in shards), "num_shards": len(shards),
             "num_skipped": sum(shard["num_skipped"] for shard in shards) + empty_skipped,
             "shards": shards}
    write_json_atomic(Path(out) / INDEX_NAME, index)
    return Path(out) / INDEX_NAME


def load_sidecar(url: str) -> dict:
    sidecar = read_json_url(url)
    if not isinstance(sidecar.get("samples"), list):
        raise ShardFormatError(f"sidecar '{url}' has no 'samples' list")
    return sidecar
