"""Tests for the anchor data: demo shard generation, the AnchorLoader's order, resume and bad samples."""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from ddrl_scale.data.anchor import AnchorLoader
from ddrl_scale.data.shards import encode_array, resolve_shards, write_demo_shards

NUM, PER_SHARD, FRAMES, SIZE = 16, 8, 4, 8


def _write(out_dir: Path, num: int = NUM, per_shard: int = PER_SHARD, seed: int = 0) -> list[Path]:
    return write_demo_shards(out_dir, num, per_shard, seed, FRAMES, SIZE, SIZE)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """16 demo samples in two shards of 8, shared by the loader tests of this module."""
    return [str(path) for path in _write(tmp_path_factory.mktemp("anchor") / "shards")]


def _keys(loader: AnchorLoader, batches: int) -> list[str]:
    return [key for _ in range(batches) for key in loader.next_batch().keys]


def _mtimes(paths: list[Path]) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in paths}


def test_write_demo_shards_reuses_existing_set(tmp_path):
    """A second call with the same parameters returns the same shards without rewriting them."""
    first = _write(tmp_path / "shards")
    assert [path.name for path in first] == ["demo-000000.tar", "demo-000001.tar"]
    before = _mtimes(first)
    second = _write(tmp_path / "shards")
    assert second == first
    assert _mtimes(second) == before


def test_write_demo_shards_regenerates_on_new_seed(tmp_path):
    """Changing a parameter (the seed) rewrites the shards with different content."""
    first = _write(tmp_path / "shards")
    contents = [path.read_bytes() for path in first]
    second = _write(tmp_path / "shards", seed=1)
    assert [path.name for path in second] == [path.name for path in first]
    assert [path.read_bytes() for path in second] != contents
    assert _write(tmp_path / "shards", seed=1) == second  # the new set is then reused


def test_write_demo_shards_regenerates_fewer_shards(tmp_path):
    """Regenerating with fewer samples returns only the new shards, holding exactly the new samples."""
    _write(tmp_path / "shards")
    smaller = _write(tmp_path / "shards", num=PER_SHARD)
    assert [path.name for path in smaller] == ["demo-000000.tar"]
    loader = AnchorLoader([str(path) for path in smaller], PER_SHARD, shuffle_buffer=1)
    assert len(set(_keys(loader, 1))) == PER_SHARD and loader.epoch == 0


def test_loader_every_sample_once_per_epoch(shards):
    """Single process: each epoch yields every sample exactly once, then the next epoch starts."""
    loader = AnchorLoader(shards, 4, seed=0, shuffle_buffer=4)
    epoch0 = _keys(loader, NUM // 4)
    assert Counter(epoch0) == Counter({key: 1 for key in epoch0}) and len(epoch0) == NUM
    assert loader.state_dict()["epoch"] == 0
    epoch1 = _keys(loader, NUM // 4)
    assert sorted(epoch1) == sorted(epoch0)
    assert loader.state_dict() == {"epoch": 1, "position": NUM, "skipped_before_epoch": 0}


def test_loader_batch_contents(shards):
    """A batch holds (B, 3, T, H, W) float latents in [0, 1], one caption and key per sample."""
    batch = AnchorLoader(shards, 3, seed=0, shuffle_buffer=4).next_batch()
    assert batch.latents.shape == (3, 3, FRAMES, SIZE, SIZE)
    assert 0.0 <= batch.latents.min() and batch.latents.max() <= 1.0
    assert len(batch.captions) == len(batch.keys) == 3 and all(batch.captions)


def test_loader_order_depends_on_seed_and_epoch(shards):
    """The order is the same for the same seed, and differs for another epoch or another seed."""
    run = _keys(AnchorLoader(shards, 4, seed=0, shuffle_buffer=4), 2 * NUM // 4)
    again = _keys(AnchorLoader(shards, 4, seed=0, shuffle_buffer=4), 2 * NUM // 4)
    other_seed = _keys(AnchorLoader(shards, 4, seed=1, shuffle_buffer=4), NUM // 4)
    assert run == again
    assert run[:NUM] != run[NUM:]  # epoch 0 vs epoch 1
    assert run[:NUM] != other_seed
    assert sorted(other_seed) == sorted(run[:NUM])


@pytest.mark.parametrize(("batch_size", "stop_after", "total"), [(4, 2, 6), (3, 5, 11), (4, 4, 8)])
def test_loader_resume_matches_uninterrupted(shards, batch_size, stop_after, total):
    """Keys of a loader stopped mid-run + a fresh loader restored from its state = an uninterrupted run."""
    uninterrupted = _keys(AnchorLoader(shards, batch_size, seed=3, shuffle_buffer=4), total)
    first = AnchorLoader(shards, batch_size, seed=3, shuffle_buffer=4)
    head = _keys(first, stop_after)
    state = first.state_dict()
    restored = AnchorLoader(shards, batch_size, seed=3, shuffle_buffer=4)
    restored.load_state_dict(dict(state))
    assert restored.state_dict() == state
    tail = _keys(restored, total - stop_after)
    assert head + tail == uninterrupted
    assert len(uninterrupted) > NUM  # every case crosses an epoch boundary


def _bad_shard(path: Path) -> Path:
    """A shard with a pickled object array, garbage .npy bytes, then one good sample."""
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    good = encode_array(np.full((FRAMES, SIZE, SIZE, 3), 255, dtype=np.uint8))
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "pickled", "video.npy": pickled.getvalue(), "txt": b"a", "json": b"{}"})
        writer.write({"__key__": "garbage", "video.npy": b"\x93NUMPY not really", "txt": b"b",
                      "json": b"{}"})
        writer.write({"__key__": "good", "video.npy": good, "txt": b"a red square", "json": b"{}"})
    return path


def test_loader_skips_corrupt_samples(tmp_path, caplog):
    """Garbage and pickled video arrays are skipped, counted and logged with their key; never fatal."""
    shard = _bad_shard(tmp_path / "bad.tar")
    loader = AnchorLoader([str(shard)], 1, seed=0, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING, logger="ddrl_scale.data.anchor"):
        batch = loader.next_batch()
    assert batch.keys == ["good"] and batch.captions == ["a red square"]
    assert batch.latents.shape == (1, 3, FRAMES, SIZE, SIZE) and float(batch.latents.min()) == 1.0
    assert loader.skipped == 2
    warnings = "\n".join(record.getMessage() for record in caplog.records)
    assert "'pickled'" in warnings and "'garbage'" in warnings and str(shard) in warnings
    assert loader.next_batch().keys == ["good"]  # the next epoch goes on


def test_loader_skipped_count_survives_resume(tmp_path, shards):
    """A restored loader reports the same skipped count as an uninterrupted one at the same point."""
    mixed = [*shards, str(_bad_shard(tmp_path / "bad.tar"))]
    uninterrupted = AnchorLoader(mixed, 3, seed=0, shuffle_buffer=4)
    _keys(uninterrupted, 5)
    first = AnchorLoader(mixed, 3, seed=0, shuffle_buffer=4)
    _keys(first, 2)
    if first.skipped == 0:
        pytest.fail("test setup: the bad samples should be read before the stop point")
    restored = AnchorLoader(mixed, 3, seed=0, shuffle_buffer=4)
    restored.load_state_dict(first.state_dict())
    _keys(restored, 3)
    assert restored.skipped == uninterrupted.skipped


def test_resolve_shards_ok(shards):
    """A folder, a glob and a brace pattern all resolve to the shard files."""
    folder = str(Path(shards[0]).parent)
    assert resolve_shards(folder) == shards
    assert resolve_shards(f"{folder}/demo-*.tar") == shards
    assert resolve_shards(f"{folder}/demo-{{000000..000001}}.tar") == shards


def test_resolve_shards_errors_name_the_path(tmp_path):
    """Missing folders, empty folders, unmatched globs and missing brace shards are named in the error."""
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        resolve_shards(str(missing))
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_folder"):
        resolve_shards(str(empty))
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "s-000000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="s-000001.tar"):
        resolve_shards(str(tmp_path / "s-{000000..000001}.tar"))


# -- the same per-sample checks as the sharded loader ---------------------------------------------------
LATENT_SHAPE = (3, 2, 4, 4)


def _latent_shards(root: Path) -> list[str]:
    """Shard 0: good, wrong-shape, NaN, caption-less, good latents; shard 1: four good samples, the
    file cut inside its third sample (a truncated tar)."""
    from ddrl_scale.data import latent_shards as fmt

    root.mkdir(parents=True)
    samples = {"a0": LATENT_SHAPE, "a1": (3, 2, 4, 8), "a2": "nan", "a3": "nocaption", "a4": LATENT_SHAPE}
    with tarfile.open(root / "s-0000.tar", "w") as tar:
        for key, kind in samples.items():
            latents = torch.full(kind if isinstance(kind, tuple) else LATENT_SHAPE, 0.5, dtype=torch.float16)
            if kind == "nan":
                latents[0, 0, 0, 0] = float("nan")
            members = fmt.encode_latents(latents, None, "safetensors")
            if kind != "nocaption":
                members["txt"] = f"caption {key}".encode()
            fmt.add_sample(tar, key, members)
    with tarfile.open(root / "s-0001.tar", "w") as tar:
        for index in range(4):
            members = fmt.encode_latents(torch.zeros(LATENT_SHAPE, dtype=torch.float16), None, "safetensors")
            fmt.add_sample(tar, f"b{index}", {**members, "txt": b"caption"})
    with tarfile.open(root / "s-0001.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name.startswith("b2."))
    with open(root / "s-0001.tar", "r+b") as handle:
        handle.truncate(cut.offset_data + cut.size // 2)
    return [str(root / "s-0000.tar"), str(root / "s-0001.tar")]


def test_replicated_loader_skips_bad_samples_as_the_sharded_loader_does(tmp_path, caplog):
    """Wrong shape, NaN, no caption, a truncated tar: skipped, counted and named by shard and key,
    the same samples and reasons as the sharded loader (both with buckets); the replicated loader
    also refuses latents of another shape than the run's with no buckets given."""
    from ddrl_scale.data.sharded import ShardedAnchorLoader

    paths = _latent_shards(tmp_path / "shards")
    bad = {("a1", paths[0]), ("a2", paths[0]), ("a3", paths[0]), ("b2", paths[1])}
    good = {"a0", "a4", "b0", "b1"}
    for loader in (AnchorLoader(paths, 1, seed=0, shuffle_buffer=1, buckets=[LATENT_SHAPE]),
                   AnchorLoader(paths, 1, seed=0, shuffle_buffer=1, latent_shape=LATENT_SHAPE),
                   ShardedAnchorLoader(paths, 1, seed=0, buckets=[LATENT_SHAPE])):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            keys = [loader.next_batch().keys[0] for _ in range(5)]  # the 5th from the next epoch
        assert set(keys[:4]) == good and loader.skipped >= len(bad), type(loader).__name__
        for key, shard in bad:
            assert f"skipping sample '{key}' of shard '{shard}'" in caplog.text, (key, caplog.text)
        for reason in ("NaN or infinite", "no caption member", "unreadable tar data"):
            assert reason in caplog.text, reason
        assert "[3, 2, 4, 8]" in caplog.text
