"""WebDataset shard format of the anchor data (anchor shards at the head of the data flow).

One sample = `{key}.video.npy` (uint8 (T, H, W, 3) pixels, or float16 latents (C, T, H, W)),
`{key}.txt` (caption) and `{key}.json` (metadata). Arrays are read with `allow_pickle=False`:
shard contents are data, never code.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import webdataset as wds

from ddrl_scale.data import synthetic

logger = logging.getLogger(__name__)


def encode_array(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_demo_shards(out_dir: str | Path, num_samples: int, samples_per_shard: int, seed: int = 0,
                      num_frames: int = 8, height: int = 16, width: int = 16) -> list[Path]:
    """Write the procedural demo videos as tar shards `demo-000000.tar`...; return the shard paths.

    A finished set is marked by `index.json`; an existing complete set with the same parameters
    is reused, so the demo generates its data once.
    """
    out_dir = Path(out_dir)
    index_path = out_dir / "index.json"
    params = {"num_samples": num_samples, "samples_per_shard": samples_per_shard, "seed": seed,
              "num_frames": num_frames, "height": height, "width": width}
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("params") == params and all((out_dir / s).is_file() for s in index["shards"]):
            return [out_dir / shard for shard in index["shards"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    # drop the old set first: a stale index or shard must never be mixed into the new one
    index_path.unlink(missing_ok=True)
    for old in out_dir.glob("demo-*.tar"):
        old.unlink()
    pattern = str(out_dir / "demo-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0) as writer:
        for key, video, caption, meta in synthetic.make_samples(num_samples, seed, num_frames,
                                                                height, width):
            writer.write({"__key__": key, "video.npy": encode_array(video),
                          "txt": caption.encode(), "json": json.dumps(meta).encode()})
    shards = [Path(pattern % index).name for index in range(-(-num_samples // samples_per_shard))]
    index_path.write_text(json.dumps({"params": params, "shards": shards}, indent=1))
    logger.info("wrote %d demo samples in %d shards under %s", num_samples, len(shards), out_dir)
    return [out_dir / shard for shard in shards]


def resolve_shards(spec: str) -> list[str]:
    """A folder (all *.tar in it), a glob, or a webdataset brace pattern / URL list -> shard URLs."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"data.shards: folder '{spec}' holds no .tar shards")
        return shards
    if any(char in spec for char in "*?[") and "{" not in spec:
        shards = sorted(str(p) for p in Path().glob(spec)) if not path.is_absolute() else sorted(
            str(p) for p in Path(path.anchor).glob(str(path.relative_to(path.anchor))))
        if not shards:
            raise FileNotFoundError(f"data.shards: pattern '{spec}' matches no file")
        return shards
    shards = list(wds.shardlists.expand_urls(spec))
    missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"data.shards: shard '{missing[0]}' does not exist")
    return shards
