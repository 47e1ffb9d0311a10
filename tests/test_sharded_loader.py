"""Tests for the sharded anchor loader: the split rule, exactly-once epochs, exact resume, bad samples."""

from __future__ import annotations

import io
import logging
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ddrl_scale.data import latent_shards as fmt
from ddrl_scale.data.anchor import AnchorLoader
from ddrl_scale.data.sharded import ShardedAnchorLoader, build_loader, gather_state
from ddrl_scale.data.sharded_split import _Item, epoch_shard_order, reader_segments
from ddrl_scale.data.sharded_workers import pack_items, unpack_items
from ddrl_scale.data.shards import write_demo_shards
from ddrl_scale.models.vae import PixelVAE

SHAPE = (3, 2, 4, 4)
OTHER_SHAPE = (3, 2, 8, 4)
SIZES = [7, 8, 5, 9, 6]  # 35 samples in uneven shards: no reader count divides them


def sample_id(key: str) -> int:
    shard, index = key.split("_")
    return int(shard) * 64 + int(index)


def write_shards(root: Path, sizes: list[int], shape_of=lambda shard, index: SHAPE,
                 recorded_shape_of=None) -> list[str]:
    """Latent shards as prepare writes them, with sidecars and index.json. Sample `s_i` holds the
    value s * 64 + i everywhere, so a batch's content can be checked against its keys."""
    (root / fmt.SIDECAR_DIR).mkdir(parents=True, exist_ok=True)
    sidecars = []
    for shard, size in enumerate(sizes):
        name, samples = f"s-{shard:04d}.tar", []
        with tarfile.open(root / name, "w") as tar:
            for index in range(size):
                key, shape = f"{shard:04d}_{index:04d}", shape_of(shard, index)
                latents = torch.full(shape, float(shard * 64 + index), dtype=torch.float16)
                members = fmt.encode_latents(latents, None, "safetensors")
                fmt.add_sample(tar, key, {**members, "txt": f"caption {key}".encode(), "json": b"{}"})
                recorded = recorded_shape_of(shard, index) if recorded_shape_of else shape
                samples.append({"key": key, "shape": list(recorded), "dtype": "fp16",
                                "member": "latents.safetensors", "bytes": len(members["latents.safetensors"]),
                                "sha256": fmt.sha256_bytes(members["latents.safetensors"]), "source": key})
        sidecar = {"name": name, "num_samples": size, "bytes": (root / name).stat().st_size,
                   "sha256": fmt.sha256_file(root / name), "samples": samples, "skipped": []}
        fmt.write_json_atomic(root / fmt.SIDECAR_DIR / f"s-{shard:04d}.json", sidecar)
        sidecars.append(sidecar)
    fmt.write_index(root, sidecars, {"dtype": "fp16"})
    return [str(root / sidecar["name"]) for sidecar in sidecars]


def all_keys(sizes: list[int]) -> list[str]:
    return [f"{shard:04d}_{index:04d}" for shard, size in enumerate(sizes) for index in range(size)]


def take(loader: ShardedAnchorLoader, batches: int) -> list[tuple[int, str]]:
    """(epoch, key) of `batches` batches, checking each latent against its key."""
    out = []
    for _ in range(batches):
        batch = loader.next_batch()
        for row, key in enumerate(batch.keys):
            assert float(batch.latents[row].flatten()[0]) == sample_id(key)
        out += list(zip(batch.epochs, batch.keys))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("sharded") / "shards", SIZES)


# -- the split rule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("counts,num_readers", [([7, 8, 5, 9, 6], 4), ([3, 0, 4], 7), ([100], 3),
                                                ([1, 1, 1, 1, 1, 1], 6), ([5, 2, 9, 1], 1)])
def test_reader_segments_cover_each_position_once(counts, num_readers):
    """Readers' segments partition every shard's samples; shares differ by at most one sample."""
    order = epoch_shard_order(len(counts), seed=5, epoch=2)
    seen: Counter = Counter()
    lengths = []
    for reader in range(num_readers):
        segments = reader_segments(counts, order, num_readers, reader)
        lengths.append(sum(end - first for _, first, end in segments))
        for shard, first, end in segments:
            assert 0 <= first < end <= counts[shard]
            seen.update((shard, index) for index in range(first, end))
    assert seen == Counter((shard, index) for shard, count in enumerate(counts) for index in range(count))
    assert max(lengths) - min(lengths) <= 1


def reference_sequence(sizes: list[int], seed: int, world_size: int, workers: int, window: int, rank: int,
                       epochs: int) -> list[tuple[int, str]]:
    """The documented rule written out plainly: shard permutation, contiguous reader ranges, window
    shuffles, round-robin over the rank's workers."""
    keys_by_shard = [[f"{s:04d}_{i:04d}" for i in range(size)] for s, size in enumerate(sizes)]
    readers, out = world_size * max(1, workers), []
    for epoch in range(epochs):
        order = epoch_shard_order(len(sizes), seed, epoch)
        sequence = [key for shard in order for key in keys_by_shard[shard]]
        streams = []
        for worker in range(max(1, workers)):
            reader = rank * max(1, workers) + worker
            share = sequence[reader * len(sequence) // readers:(reader + 1) * len(sequence) // readers]
            stream = []
            for start in range(0, len(share), window):
                chunk = share[start:start + window]
                rng = np.random.default_rng([seed, epoch, readers, reader, start // window])
                permutation = rng.permutation(len(chunk))
                stream += [chunk[j] for j in permutation]
            streams.append(stream)
        for step in range(max(len(stream) for stream in streams)):
            out += [(epoch, stream[step]) for stream in streams if step < len(stream)]
    return out


@pytest.mark.parametrize("workers,chunk", [(0, 1), (2, 3)])
def test_loader_follows_the_reference_rule(shards, workers, chunk):
    """Both ranks' batches, over two epochs, are exactly the plainly written rule's sequence."""
    for rank in range(2):
        loader = ShardedAnchorLoader(shards, 3, seed=11, rank=rank, world_size=2, num_workers=workers,
                                     shuffle_window=4, worker_chunk=chunk)
        expected = reference_sequence(SIZES, 11, 2, workers, 4, rank, epochs=3)
        got = take(loader, 2 * loader.epoch_size() // 3 + 1)
        assert got == expected[:len(got)]
        loader.close()


def test_one_epoch_yields_every_sample_once_2_ranks_2_workers(shards):
    """Acceptance: 2 ranks x 2 workers; the union of both ranks' epoch-0 samples is every key once."""
    epoch_zero = []
    for rank in range(2):
        loader = ShardedAnchorLoader(shards, 4, seed=0, rank=rank, world_size=2, num_workers=2, prefetch=2)
        taken = take(loader, loader.epoch_size() // 4 + 2)  # past the end of its epoch 0
        assert {epoch for epoch, _ in taken} == {0, 1}
        epoch_zero += [key for epoch, key in taken if epoch == 0]
        assert loader.metrics()["skipped"] == 0
        loader.close()
    assert Counter(epoch_zero) == Counter(all_keys(SIZES))


def test_pack_items_round_trip():
    """Worker chunks: tensors of mixed dtypes and odd sizes (and bad items without one) come back
    equal, as aligned views of one buffer."""
    tensors = [torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1), None,
               torch.randn(3, 1, 2, 5).half(), torch.randn(2, 1, 1, 3).bfloat16(), torch.randn(1, 1, 1, 1)]
    items = [_Item(0, 0, position, "s", position, f"k{position}", tensor, False, "", None, 0,
                   None if tensor is not None else "bad") for position, tensor in enumerate(tensors)]
    slot, too_small = torch.empty(1024, dtype=torch.uint8), torch.empty(16, dtype=torch.uint8)
    for into, copy in ((None, False), (slot, True), (too_small, False)):
        for item, tensor in zip(items, tensors):
            item.tensor = tensor
        packed_items, buffer, layout = pack_items(items, into)
        assert all(item.tensor is None for item in packed_items) and buffer.dtype == torch.uint8
        assert (buffer is slot) == (into is slot)  # a slot is used when the chunk fits in it
        for item, original in zip(unpack_items(packed_items, buffer, layout, copy), tensors):
            if original is None:
                assert item.tensor is None
                continue
            assert item.tensor.dtype == original.dtype and torch.equal(item.tensor, original)
            shares = item.tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
            assert shares != copy  # views of the buffer, or copies that outlive a reused slot


def test_waiting_samples_survive_reused_worker_buffers(tmp_path):
    """Samples of a rare shape wait in their bucket while the workers' few shared buffers are reused
    many times over: their latents must still be their own (the main process copies them out)."""
    paths = write_shards(tmp_path / "shards", [10, 10],
                         shape_of=lambda s, i: OTHER_SHAPE if i % 5 == 0 else SHAPE)
    loader = ShardedAnchorLoader(paths, 3, num_workers=2, prefetch=1, worker_chunk=1, shuffle_window=2)
    taken = take(loader, 12)  # checks every latent against its key
    assert sum(1 for _, key in taken if int(key.split("_")[1]) % 5 == 0) >= 3
    loader.close()


def test_latents_dtype_none_keeps_the_stored_dtype(shards):
    """latents_dtype=None: fp16 batches with the same values the float32 batches hold."""
    half = ShardedAnchorLoader(shards, 4, seed=1, latents_dtype=None).next_batch()
    full = ShardedAnchorLoader(shards, 4, seed=1).next_batch()
    assert half.latents.dtype == torch.float16 and full.latents.dtype == torch.float32
    assert half.keys == full.keys and torch.equal(half.latents.float(), full.latents)


# -- resume ---------------------------------------------------------------------------------------------
def _mixed_shards(root: Path) -> list[str]:
    """Two shape buckets (so partial buckets wait in the state) plus a truncated shard and a sample
    whose tensor disagrees with the index (bad samples keep their positions across a resume)."""
    paths = write_shards(root, [6, 7, 5], shape_of=lambda s, i: OTHER_SHAPE if (s + i) % 3 == 0 else SHAPE,
                         recorded_shape_of=lambda s, i: SHAPE if (s, i) == (2, 1) else (
                             OTHER_SHAPE if (s + i) % 3 == 0 else SHAPE))
    _truncate_inside(paths[1], "0001_0004")
    return paths


def _truncate_inside(path: str, key: str) -> None:
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{key}.latents.safetensors")
    with open(path, "r+b") as handle:
        handle.truncate(member.offset_data + member.size // 2)


@pytest.mark.parametrize("workers,batch_prefetch,stops", [(0, 0, [1, 2, 3, 5, 8]), (0, 3, [2, 5]),
                                                          (2, 2, [3, 7])])
def test_resume_continues_with_exactly_the_next_samples(tmp_path, workers, batch_prefetch, stops):
    """Stop after k batches, restore a fresh loader from the state: head + tail == uninterrupted,
    across epoch boundaries, with partial buckets waiting, bad samples in the stream, and batches
    prefetched beyond the saved position."""
    paths = _mixed_shards(tmp_path / "shards")

    def new() -> ShardedAnchorLoader:
        return ShardedAnchorLoader(paths, 2, seed=3, rank=1, world_size=2, num_workers=workers,
                                   shuffle_window=3, batch_prefetch=batch_prefetch)

    total = 10
    reference = new()
    uninterrupted = take(reference, total)
    assert len({epoch for epoch, _ in uninterrupted}) >= 2  # crosses an epoch boundary
    reference.close()
    for stop in stops:
        first = new()
        head = take(first, stop)
        if batch_prefetch:
            time.sleep(0.05)  # let the thread run ahead: the state must still be the consumed one
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)  # what a checkpoint does; must load without pickle
        assert take(first, 1) == uninterrupted[2 * stop:2 * stop + 2]  # close() keeps the position
        first.close()
        assert take(first, 1) == uninterrupted[2 * stop + 2:2 * stop + 4]
        first.close()
        restored = new()
        restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
        tail = take(restored, total - stop)
        assert head + tail == uninterrupted, f"stop after {stop} batches"
        assert restored.metrics()["skipped"] == reference.metrics()["skipped"]
        restored.close()


def test_gathered_world_state_restores_each_rank(shards):
    """A {"ranks": ...} state (what one rank saves for all) restores every rank at its own place."""
    loaders = [ShardedAnchorLoader(shards, 3, seed=2, rank=r, world_size=2) for r in range(2)]
    heads = [take(loader, 4) for loader in loaders]
    world = {"ranks": {str(r): loaders[r].state_dict() for r in range(2)}}
    assert gather_state(loaders[0]) == {"ranks": {"0": loaders[0].state_dict()}}  # no process group
    for rank in range(2):
        uninterrupted = take(ShardedAnchorLoader(shards, 3, seed=2, rank=rank, world_size=2), 9)
        restored = ShardedAnchorLoader(shards, 3, seed=2, rank=rank, world_size=2)
        restored.load_state_dict(world)
        assert heads[rank] + take(restored, 5) == uninterrupted


def _gather_in_rank(rank: int, shards: list[str], store_path: str, out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    loader = ShardedAnchorLoader(shards, 3, seed=2, rank=rank, world_size=2)
    take(loader, 4 + rank)  # the ranks stop at different places
    state = gather_state(loader)
    if rank == 0:
        torch.save(state, out_path)
    dist.destroy_process_group()


def test_gather_state_across_processes(shards, tmp_path):
    """Two gloo processes: gather_state on every rank collects both positions; each rank restored
    from rank 0's file continues exactly where it stopped."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    out = tmp_path / "state.pt"
    store = str(tmp_path / "store")
    processes = [context.Process(target=_gather_in_rank, args=(rank, shards, store, str(out)))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    world = torch.load(out, weights_only=True)
    assert sorted(world["ranks"]) == ["0", "1"]
    for rank in range(2):
        uninterrupted = take(ShardedAnchorLoader(shards, 3, seed=2, rank=rank, world_size=2), 8)
        restored = ShardedAnchorLoader(shards, 3, seed=2, rank=rank, world_size=2)
        restored.load_state_dict(world)
        assert take(restored, 4 - rank) == uninterrupted[3 * (4 + rank):]


def test_topology_change_starts_the_next_epoch(shards, caplog):
    """Restoring a 2-rank state into 1 rank cannot be exact: warn, start epoch (max saved + 1)."""
    loaders = [ShardedAnchorLoader(shards, 3, seed=2, rank=r, world_size=2) for r in range(2)]
    take(loaders[0], 7)  # rank 0 into its epoch 1
    take(loaders[1], 2)
    single = ShardedAnchorLoader(shards, 3, seed=2)
    with caplog.at_level(logging.WARNING, logger="ddrl_scale.data.sharded"):
        single.load_state_dict({"ranks": {str(r): loaders[r].state_dict() for r in range(2)}})
    assert "starting epoch 2 afresh" in caplog.text
    assert {epoch for epoch, _ in take(single, 2)} == {2}


# -- bad data -------------------------------------------------------------------------------------------
def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    """Acceptance: a shard with a truncated member and one with a wrong-shape tensor; 2 ranks x 2 workers
    go on, the metrics count every bad sample and the log names each shard and key."""
    paths = write_shards(tmp_path / "shards", [6, 6, 6],
                         shape_of=lambda s, i: (3, 2, 4, 5) if (s, i) == (2, 3) else SHAPE)
    # shard 2's sample 3 really is (3, 2, 4, 5) but the index says SHAPE; shard 0 ends inside sample 2
    fmt.write_json_atomic(tmp_path / "shards/index/s-0002.json", {
        **fmt.load_sidecar(str(tmp_path / "shards/index/s-0002.json")),
        "samples": [{**sample, "shape": list(SHAPE)} for sample in
                    fmt.load_sidecar(str(tmp_path / "shards/index/s-0002.json"))["samples"]]})
    _truncate_inside(paths[0], "0000_0002")
    bad = {("0000_0002", paths[0]), ("0000_0003", paths[0]), ("0000_0004", paths[0]),
           ("0000_0005", paths[0]), ("0002_0003", paths[2])}
    epoch_zero, skipped = [], 0
    with caplog.at_level(logging.WARNING, logger="ddrl_scale.data.sharded"):
        for rank in range(2):
            loader = ShardedAnchorLoader(paths, 2, seed=0, rank=rank, world_size=2, num_workers=2)
            taken = take(loader, loader.epoch_size() // 2 + 1)
            epoch_zero += [key for epoch, key in taken if epoch == 0]
            skipped += loader.metrics()["skipped"]
            assert {(key, shard) for shard, key, _ in loader.bad_samples} <= bad
            loader.close()
    assert skipped >= len(bad)  # the second epoch may meet some of them again
    assert Counter(epoch_zero) == Counter(set(all_keys([6, 6, 6])) - {key for key, _ in bad})
    for key, shard in bad:
        assert f"'{key}' of shard '{shard}'" in caplog.text
    assert "(3, 2, 4, 5)" in caplog.text or "[3, 2, 4, 5]" in caplog.text


def test_configured_buckets_reject_other_shapes(tmp_path):
    """With buckets given, a sample of another shape is a bad sample, not a new bucket."""
    paths = write_shards(tmp_path / "shards", [6], shape_of=lambda s, i: OTHER_SHAPE if i == 2 else SHAPE)
    loader = ShardedAnchorLoader(paths, 5, seed=0, buckets=[SHAPE])
    batch = loader.next_batch()
    assert "0000_0002" not in batch.keys and loader.skipped == 1
    assert "not one of the configured buckets" in loader.bad_samples[0][2]


# -- sources --------------------------------------------------------------------------------------------
def test_pipe_urls_read_like_local_files(shards):
    """`pipe:` shard URLs (the form used for s3 and other remote stores) give the same batches."""
    index = str(Path(shards[0]).parent / fmt.INDEX_NAME)
    local = take(ShardedAnchorLoader(shards, 3, seed=4), 14)
    piped = ShardedAnchorLoader([f"pipe:cat {path}" for path in shards], 3, seed=4, index=index)
    assert take(piped, 14) == local
    with pytest.raises(fmt.ShardFormatError, match="need an index"):
        ShardedAnchorLoader([f"pipe:cat {path}" for path in shards], 3)


def test_demo_pixel_shards_match_the_replicated_loader(tmp_path):
    """Demo shards (uint8 pixels, no sample index): the sharded loader's latents are the encoded
    pixels, equal to what the replicated AnchorLoader gives for the same keys."""
    paths = [str(p) for p in write_demo_shards(tmp_path / "demo", 12, 5, 0, 4, 8, 8)]
    vae = PixelVAE()
    replicated = AnchorLoader(paths, 12, seed=0, shuffle_buffer=1, encode=vae.encode).next_batch()
    expected = dict(zip(replicated.keys, replicated.latents))
    loader = ShardedAnchorLoader(paths, 4, seed=0, rank=0, world_size=1, encode=vae.encode)
    for _ in range(3):
        batch = loader.next_batch()
        for key, latents in zip(batch.keys, batch.latents):
            torch.testing.assert_close(latents, expected[key], rtol=0, atol=0)


def test_members_outside_the_sample_scheme_are_ignored(tmp_path):
    """Folders, hidden `._*` files and dot-less names in a shard are not samples and break nothing."""
    path = tmp_path / "odd.tar"
    members = fmt.encode_latents(torch.ones(SHAPE, dtype=torch.float16), None, "safetensors")
    with tarfile.open(path, "w") as tar:
        for name, data in (("README", b"x"), ("._0000_0000.txt", b"y"), ("sub/.hidden", b"z")):
            tar.addfile(fmt.tar_info(name, len(data)), io.BytesIO(data))
        fmt.add_sample(tar, "0000_0001", {**members, "txt": b"one"})
    assert fmt.count_samples(str(path)) == 1
    batch = ShardedAnchorLoader([str(path)], 1).next_batch()
    assert batch.keys == ["0000_0001"] and batch.captions == ["one"]


def test_constructor_errors_name_the_problem(shards):
    with pytest.raises(ValueError, match="fewer than the 40 readers"):
        ShardedAnchorLoader(shards, 1, world_size=20, rank=0, num_workers=2)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ShardedAnchorLoader(shards, 1, world_size=2, rank=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ShardedAnchorLoader(shards, 0)
    with pytest.raises(fmt.ShardFormatError, match="not listed in the index"):
        ShardedAnchorLoader([*shards, "/elsewhere/x-0000.tar"], 1, index=str(Path(shards[0]).parent /
                                                                                  fmt.INDEX_NAME))


def test_build_loader_picks_the_split(shards):
    """replicated -> AnchorLoader with the global batch; sharded -> this rank's share of it."""
    folder = str(Path(shards[0]).parent)
    assert isinstance(build_loader(folder, 4, split="replicated"), AnchorLoader)
    sharded = build_loader(folder, 4, split="sharded", rank=1, world_size=2, shuffle_buffer=8)
    assert isinstance(sharded, ShardedAnchorLoader) and len(sharded.next_batch().keys) == 2
    with pytest.raises(ValueError, match="multiple of the 3 data-parallel"):
        build_loader(folder, 4, split="sharded", world_size=3)
    with pytest.raises(ValueError, match="data.split"):
        build_loader(folder, 4, split="by-node")
