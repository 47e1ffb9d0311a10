"""Tests for `ddrl data prepare | validate | stats`: real mp4 files -> latent shards -> a DDRL step."""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ddrl_scale.config import load_config
from ddrl_scale.data import latent_shards as fmt
from ddrl_scale.data.commands import add_data_commands
from ddrl_scale.data.encoders import PatchVAE, build_text_encoder, build_vae
from ddrl_scale.data.prepare import PrepareError, PrepareSettings, prepare, task_from_env
from ddrl_scale.data.sharded import ShardedAnchorLoader
from ddrl_scale.data.validate import stats, validate
from ddrl_scale.data.video_io import VideoDecodeError, decode_video, write_video

RED, BLUE = (200, 20, 40), (30, 60, 210)


def pattern_video(num_frames: int = 8, height: int = 32, width: int = 48) -> np.ndarray:
    """Left half RED, right half BLUE; the green channel counts frames (10 per frame)."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[:, :, : width // 2] = RED
    frames[:, :, width // 2:] = BLUE
    frames[..., 1] = (np.arange(num_frames) * 10)[:, None, None]
    return frames


def make_videos(folder: Path, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` small real mp4 files clip0.mp4... with captions (every other one as .json)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, videos = np.random.default_rng(seed), []
    for index in range(count):
        frames = np.repeat(rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8), 8, axis=1).repeat(8, axis=2)
        write_video(folder / f"clip{index}.mp4", frames)
        if index % 2:
            (folder / f"clip{index}.json").write_text(json.dumps({"caption": f"clip number {index}"}))
        else:
            (folder / f"clip{index}.txt").write_text(f"clip number {index}")
        videos.append(frames)
    return videos


SMALL = PrepareSettings(num_frames=4, height=8, width=8, samples_per_shard=3)


# -- decoding --------------------------------------------------------------------------------------------
def test_decode_video_samples_resizes_and_crops(tmp_path):
    """48x32 -> 16x16: scaled to cover (24x16), centre-cropped; frames 0, 2, 4 by stride 2."""
    path = write_video(tmp_path / "pattern.mp4", pattern_video())
    decoded = decode_video(path, num_frames=3, height=16, width=16, frame_stride=2)
    assert decoded.frames.shape == (3, 16, 16, 3) and decoded.frames.dtype == np.uint8
    assert decoded.source_size == (32, 48) and decoded.frame_indices == [0, 2, 4]
    assert decoded.source_fps == 8.0
    frames = decoded.frames.astype(int)
    for position, frame_index in enumerate([0, 2, 4]):
        red, blue = frames[position, :, 1:6], frames[position, :, 10:15]
        assert np.abs(red[..., [0, 2]] - np.array(RED)[[0, 2]]).max() <= 3
        assert np.abs(blue[..., [0, 2]] - np.array(BLUE)[[0, 2]]).max() <= 3
        assert np.abs(frames[position, ..., 1] - 10 * frame_index).max() <= 3
    # the same bytes decode the same way from memory (tar members)
    from_bytes = decode_video(path.read_bytes(), 3, 16, 16, 2)
    np.testing.assert_array_equal(from_bytes.frames, decoded.frames)


def test_decode_video_errors_say_why(tmp_path):
    path = write_video(tmp_path / "short.mp4", pattern_video(num_frames=3))
    with pytest.raises(VideoDecodeError, match="too short: 3 of the 4"):
        decode_video(path, 4, 8, 8)
    with pytest.raises(VideoDecodeError, match="cannot decode"):
        decode_video(b"definitely not an mp4", 4, 8, 8)
    with pytest.raises(VideoDecodeError, match="cannot decode"):
        decode_video(tmp_path / "missing.mp4", 4, 8, 8)


# -- prepare ---------------------------------------------------------------------------------------------
def _samples(out: Path) -> dict[str, fmt.Sample]:
    found = {}
    for shard in sorted(out.glob("*.tar")):
        for raw in fmt.iter_shard(str(shard)):
            found[raw.key] = fmt.decode_sample(raw.key, raw.members)
    return found


def test_prepare_folder_writes_the_encoded_frames_and_lists_bad_inputs(tmp_path):
    """Folder input: latents equal PixelVAE(decoded frames) in fp16; a broken file, a caption-less
    video and a too-short video are skipped and listed with their reason; validate passes."""
    videos = tmp_path / "videos"
    make_videos(videos, 5)
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but then garbage")
    (videos / "broken.txt").write_text("a broken file")
    write_video(videos / "nocaption.mp4", pattern_video(8, 16, 16))
    write_video(videos / "short.mp4", pattern_video(2, 16, 16))
    (videos / "short.txt").write_text("too short")
    summary = prepare(str(videos), tmp_path / "out", SMALL)
    assert (summary.units_total, summary.samples_written, summary.inputs_skipped) == (3, 5, 3)
    reasons = {entry["source"]: entry["reason"] for entry in summary.skipped}
    assert "cannot decode" in reasons["broken.mp4"] and "no caption" in reasons["nocaption.mp4"]
    assert "too short" in reasons["short.mp4"]
    index = json.loads((tmp_path / "out" / fmt.INDEX_NAME).read_text())
    # the third unit (nocaption.mp4, short.mp4) has no good input: no shard for it
    assert index["num_samples"] == 5 and index["num_skipped"] == 3 and index["num_shards"] == 2
    assert not (tmp_path / "out" / "part-000002.tar").exists()
    samples = _samples(tmp_path / "out")
    assert sorted(samples) == [f"clip{i}" for i in range(5)]
    vae = build_vae("pixel")
    for index_ in range(5):
        frames = decode_video(videos / f"clip{index_}.mp4", 4, 8, 8).frames
        reference = vae.encode(torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255)[0].half()
        sample = samples[f"clip{index_}"]
        assert sample.tensor.dtype == torch.float16 and sample.caption == f"clip number {index_}"
        torch.testing.assert_close(sample.tensor, reference, rtol=0, atol=0)
        assert sample.meta["source"] == f"clip{index_}.mp4" and sample.meta["source_size"] == [32, 32]
    report = validate(str(tmp_path / "out"))
    assert report.ok and report.samples_ok == 5, report.summary()
    summary_stats = stats(str(tmp_path / "out"), scan=True)
    assert summary_stats["shapes"] == {"3x4x8x8": 5} and summary_stats["samples_scanned"] == 5
    assert summary_stats["caption_words"]["max"] == 3


def _video2dataset_tar(path: Path, videos: list[np.ndarray], truncate_key: str | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for index, frames in enumerate(videos):
            # the mp4 goes through a file outside the input folder (which must hold only tars)
            encoded = write_video(path.parent.parent / f"_v{index}.mp4", frames).read_bytes()
            members = {"mp4": encoded, "txt": f"tar clip {index}".encode(),
                       "json": json.dumps({"url": f"http://example/{index}"}).encode()}
            fmt.add_sample(tar, f"{index:09d}", members)
    if truncate_key:
        with tarfile.open(path) as tar:
            member = tar.getmember(f"{truncate_key}.mp4")
        with open(path, "r+b") as handle:
            handle.truncate(member.offset_data + member.size // 2)
    return path


def test_prepare_video2dataset_tars(tmp_path):
    """Tar input ({key}.mp4/.txt/.json): one output shard per input tar, keys kept; a truncated
    member ends its tar: that sample and the ones after it are listed as skipped."""
    inputs = tmp_path / "v2d"
    inputs.mkdir()
    clips = [pattern_video(6, 16, 24) for _ in range(3)]
    _video2dataset_tar(inputs / "00000.tar", clips)
    _video2dataset_tar(inputs / "00001.tar", clips, truncate_key="000000001")
    summary = prepare(str(inputs), tmp_path / "out", SMALL)
    assert summary.units_total == 2 and summary.samples_written == 3 + 1
    assert any("unreadable tar data" in entry["reason"] and entry["source"].endswith("000000001")
               for entry in summary.skipped)
    samples = _samples(tmp_path / "out")
    assert {key for key in samples} == {"000000000", "000000001", "000000002"}
    assert samples["000000002"].meta["url"] == "http://example/2"
    assert validate(str(tmp_path / "out")).ok


def test_prepare_resumes_over_tasks_and_detects_changes(tmp_path, monkeypatch):
    """Two array tasks share the units; the last one writes the index; a rerun redoes only a shard
    whose checksum broke; other settings in the same folder are refused."""
    videos = tmp_path / "videos"
    make_videos(videos, 7)
    out = tmp_path / "out"
    first = prepare(str(videos), out, SMALL, task_index=0, num_tasks=2)
    assert first.units_in_task == 2 and first.index_path is None  # units 0 and 2 of 3
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert task_from_env(None, None) == (1, 2)
    second = prepare(str(videos), out, SMALL)  # task 1 of 2 from the SLURM variables
    assert second.units_in_task == 1 and second.index_path == out / fmt.INDEX_NAME
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    mtimes = {path.name: path.stat().st_mtime_ns for path in out.glob("*.tar")}
    again = prepare(str(videos), out, SMALL)
    assert (again.units_already_done, again.units_written) == (3, 0)
    shard = out / "part-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    repaired = prepare(str(videos), out, SMALL)
    assert repaired.units_written == 1 and validate(str(out)).ok
    assert (out / "part-000000.tar").stat().st_mtime_ns == mtimes["part-000000.tar"]  # not rewritten
    with pytest.raises(PrepareError, match=r"different settings \['num_frames'\]"):
        prepare(str(videos), out, PrepareSettings(num_frames=2, height=8, width=8, samples_per_shard=3))
    overwritten = prepare(str(videos), out, PrepareSettings(num_frames=2, height=8, width=8,
                                                            samples_per_shard=3), overwrite=True)
    assert overwritten.units_written == 3 and validate(str(out)).ok


def test_prepare_workers_write_the_same_bytes(tmp_path):
    """Two processes or one: identical shards (deterministic tar headers, same latents)."""
    videos = tmp_path / "videos"
    make_videos(videos, 6)
    prepare(str(videos), tmp_path / "one", SMALL, workers=1)
    prepare(str(videos), tmp_path / "two", SMALL, workers=2)
    for name in ("part-000000.tar", "part-000001.tar"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.parametrize("vae,dtype,latent_format,shape", [
    ("patch:2", "bf16", "safetensors", [12, 4, 4, 4]),
    ("pixel", "fp16", "npy", [3, 4, 8, 8]),
])
def test_prepare_formats_and_text_embeddings(tmp_path, vae, dtype, latent_format, shape):
    """bf16 safetensors and fp16 npy, with caption embeddings; the patch VAE's latents decode back
    to the frames exactly (up to the storage dtype)."""
    videos = tmp_path / "videos"
    make_videos(videos, 2)
    settings = PrepareSettings(num_frames=4, height=8, width=8, vae=vae, dtype=dtype,
                               latent_format=latent_format, text_encoder="hash:8:6")
    prepare(str(videos), tmp_path / "out", settings)
    samples = _samples(tmp_path / "out")
    sample = samples["clip0"]
    assert list(sample.tensor.shape) == shape and sample.tensor.dtype == fmt.DTYPES[dtype]
    expected_text = build_text_encoder("hash:8:6").encode(["clip number 0"])[0]
    torch.testing.assert_close(sample.text.float(), expected_text, atol=1e-2, rtol=1e-2)
    frames = decode_video(videos / "clip0.mp4", 4, 8, 8).frames
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255
    decoded = build_vae(vae).decode(sample.tensor[None].float())[0]
    torch.testing.assert_close(decoded, pixels, atol=1e-2, rtol=0)
    loader = ShardedAnchorLoader([str(p) for p in sorted((tmp_path / "out").glob("*.tar"))], 2)
    batch = loader.next_batch()
    assert batch.text is not None and tuple(batch.text.shape) == (2, 6, 8)
    assert validate(str(tmp_path / "out")).ok


def test_encoder_specs_and_patch_vae():
    videos = torch.rand(2, 3, 2, 4, 6)
    vae = PatchVAE(2)
    torch.testing.assert_close(vae.decode(vae.encode(videos)), videos)
    assert vae.encode(videos).shape == (2, 12, 2, 2, 3)
    for bad in ("patch:x", "vqgan", "diffusers:/no/such/folder"):
        with pytest.raises((ValueError, FileNotFoundError)):
            build_vae(bad)
    with pytest.raises(ValueError, match="hash:<dim>:<max_tokens>"):
        build_text_encoder("hash:8")
    with pytest.raises(PrepareError, match="npy stores fp16 only"):
        PrepareSettings(dtype="bf16", latent_format="npy")


def test_diffusers_vae_adapter_matches_the_model(tmp_path):
    """The adapter's latents are the model's posterior mode, normalised by latents_mean/std; the
    `diffusers:<folder>` spec loads a saved model the same."""
    diffusers = pytest.importorskip("diffusers", reason="needs the optional 'diffusers' package")
    from ddrl_scale.data.encoders import DiffusersVideoVAE

    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                       attn_scales=[], temperal_downsample=[False],
                                       latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 1.0, 0.5, 1.5])
    adapter = DiffusersVideoVAE(model)
    videos = torch.rand(1, 3, 5, 16, 16)
    with torch.no_grad():
        raw = model.encode(videos * 2 - 1).latent_dist.mode()
    mean, std = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([2.0, 1.0, 0.5, 1.5])
    latents = adapter.encode(videos)
    torch.testing.assert_close(latents, (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1))
    with torch.no_grad():
        reference = ((model.decode(raw).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(adapter.decode(latents), reference, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "wan_vae")
    torch.testing.assert_close(build_vae(f"diffusers:{tmp_path / 'wan_vae'}").encode(videos), latents)


# -- validate --------------------------------------------------------------------------------------------
def _rewrite_sample(shard: Path, key: str, members: dict[str, bytes]) -> None:
    """Replace one sample's members in a shard, keeping the others byte for byte."""
    with tarfile.open(shard) as tar:
        entries = [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]
    with tarfile.open(shard, "w") as tar:
        for info, data in entries:
            sample_key, suffix = fmt.split_member_name(info.name)
            if sample_key == key and suffix in members:
                data = members[suffix]
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_validate_names_bad_samples_by_shard_and_key(tmp_path):
    """A wrong-shape tensor, a truncated shard and a checksum change are each named."""
    videos = tmp_path / "videos"
    make_videos(videos, 6)
    out = tmp_path / "out"
    prepare(str(videos), out, SMALL)
    wrong = fmt.encode_latents(torch.zeros(3, 4, 8, 7, dtype=torch.float16), None, "safetensors")
    _rewrite_sample(out / "part-000000.tar", "clip1", wrong)
    with tarfile.open(out / "part-000001.tar") as tar:
        member = tar.getmember("clip4.latents.safetensors")
    with open(out / "part-000001.tar", "r+b") as handle:
        handle.truncate(member.offset_data + 10)
    report = validate(str(out), workers=2)
    assert not report.ok and report.samples_ok == 2 + 1
    assert report.bad_keys() == [("part-000000.tar", "clip1"), ("part-000001.tar", "clip4"),
                                 ("part-000001.tar", "clip5")]
    text = report.summary()
    assert "shape [3, 4, 8, 7] where the index records [3, 4, 8, 8]" in text
    assert "SHA-256 of the shard differs" in text or "size" in text


# -- command line ----------------------------------------------------------------------------------------
def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ddrl data")
    add_data_commands(parser.add_subparsers(dest="data_command", required=True))
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except SystemExit as stop:
        return int(stop.code)
    return 0


def test_cli_commands(tmp_path, capsys):
    videos = tmp_path / "videos"
    make_videos(videos, 4)
    out = str(tmp_path / "out")
    assert _run(["prepare", str(videos), "--out", out, "--num-frames", "4", "--height", "8", "--width", "8",
                 "--samples-per-shard", "2", "--workers", "2"]) == 0
    assert "index: " in capsys.readouterr().out
    assert _run(["validate", out]) == 0
    assert _run(["stats", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["num_samples"] == 4
    Path(out, "part-000001.tar").write_bytes(b"")
    assert _run(["validate", out, "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert {problem["key"] for problem in problems if problem["key"]} == {"clip2", "clip3"}
    assert _run(["validate", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert _run(["prepare", str(videos), "--out", out, "--num-frames", "0"]) == 2


# -- the round trip --------------------------------------------------------------------------------------
def test_round_trip_mp4_to_a_ddrl_step(tmp_path, tiny_overrides):
    """Acceptance: real mp4 files -> prepare -> validate -> sharded loader -> one DDRL step."""
    from ddrl_scale.train.trainer import Trainer

    videos = tmp_path / "videos"
    make_videos(videos, 6)
    out = tmp_path / "anchor"
    prepare(str(videos), out, SMALL, workers=2)
    assert validate(str(out)).ok
    config = load_config(None, [*tiny_overrides, f"data.shards={out}", "train.steps=1"])
    trainer = Trainer(config)
    shards = [str(path) for path in sorted(out.glob("*.tar"))]
    trainer.loader = ShardedAnchorLoader(shards, config.algo.prompts_per_step, config.run.seed,
                                         num_workers=1, buckets=[(3, 4, 8, 8)])
    metrics = trainer.iteration()
    assert metrics["step"] == 1 and math.isfinite(metrics["loss"]) and metrics["data_loss"] > 0
    assert trainer.loader.metrics()["samples"] == 2 and trainer.loader.skipped == 0
    trainer.loader.close()


# -- what `ddrl data prepare` says (issue 24) --------------------------------------------------------------
def _bad_inputs(folder: Path) -> None:
    """An empty file, a file of junk bytes and a caption-less video, all sorted after clip*."""
    (folder / "x_empty.mp4").write_bytes(b"")
    (folder / "x_empty.txt").write_text("an empty file")
    (folder / "x_junk.mp4").write_bytes(b"definitely not an mp4 file")
    (folder / "x_junk.txt").write_text("junk")
    write_video(folder / "x_nocaption.mp4", pattern_video(8, 16, 16))


def test_prepare_says_empty_file_and_names_each_skipped_input_once(tmp_path, capsys, caplog):
    """0 bytes -> "empty file"; FFmpeg's errno and file name are not repeated; every skipped input
    appears once in all the output (the summary), not again in the log."""
    videos = tmp_path / "videos"
    make_videos(videos, 3)
    _bad_inputs(videos)
    caplog.set_level("DEBUG", logger="ddrl_scale.data.prepare")
    caplog.set_level("INFO")
    assert _run(["prepare", str(videos), "--out", str(tmp_path / "out"), "--num-frames", "4",
                 "--height", "8", "--width", "8", "--samples-per-shard", "3"]) == 0
    out = capsys.readouterr().out
    assert "  skipped x_empty.mp4: empty file (0 bytes)\n" in out
    assert "  skipped x_junk.mp4: cannot decode video (Invalid data found when processing input)\n" in out
    assert "Errno" not in out and "<none>" not in out
    logged = "\n".join(record.getMessage() for record in caplog.records if record.levelno >= 20)
    for name in ("x_empty.mp4", "x_junk.mp4", "x_nocaption.mp4"):
        assert (out + logged).count(name) == 1, (name, out, logged)


def test_prepare_writes_no_empty_shard_and_a_rerun_reports_the_index(tmp_path, capsys):
    """The last unit's three inputs are all bad: no part-000001.tar, the index lists one shard and
    counts the three skipped; the folder validates and loads; a rerun prints the index's totals."""
    videos, out = tmp_path / "videos", tmp_path / "out"
    make_videos(videos, 3)
    _bad_inputs(videos)
    argv = ["prepare", str(videos), "--out", str(out), "--num-frames", "4", "--height", "8",
            "--width", "8", "--samples-per-shard", "3"]
    assert _run(argv) == 0
    first = capsys.readouterr().out
    assert sorted(path.name for path in out.glob("*.tar*")) == ["part-000000.tar"]
    index = json.loads((out / fmt.INDEX_NAME).read_text())
    assert (index["num_shards"], index["num_samples"], index["num_skipped"]) == (1, 3, 3)
    assert [shard["name"] for shard in index["shards"]] == ["part-000000.tar"]
    sidecar = json.loads((out / fmt.SIDECAR_DIR / "part-000001.json").read_text())
    assert sidecar["num_samples"] == 0 and len(sidecar["skipped"]) == 3  # the reasons are kept
    assert "3 samples in 1 shards, 3 inputs skipped in the index" in first
    assert validate(str(out)).ok
    assert ShardedAnchorLoader([str(out / "part-000000.tar")], 3).num_samples == 3
    assert _run(argv) == 0
    again = capsys.readouterr().out
    assert "all already done" in again and "0 inputs skipped" not in again
    assert "3 samples in 1 shards, 3 inputs skipped in the index" in again


def test_prepare_names_the_bad_member_of_a_tar_input(tmp_path):
    inputs = tmp_path / "v2d"
    inputs.mkdir()
    tar_path = _video2dataset_tar(inputs / "00000.tar", [pattern_video(6, 16, 24)])
    with tarfile.open(tar_path, "a") as tar:
        fmt.add_sample(tar, "000000009", {"mp4": b"junk bytes", "txt": b"a junk member"})
        fmt.add_sample(tar, "000000010", {"mp4": b"", "txt": b"an empty member"})
    summary = prepare(str(inputs), tmp_path / "out", SMALL)
    reasons = {entry["source"].rsplit(":", 1)[1]: entry["reason"] for entry in summary.skipped}
    assert reasons == {
        "000000009": "member '000000009.mp4': cannot decode video (Invalid data found when processing input)",
        "000000010": "member '000000010.mp4': empty file (0 bytes)"}


def test_prepare_names_a_missing_input_as_the_input(tmp_path, capsys):
    for missing, words in ((tmp_path / "no_such_folder", "input '{}' does not exist"),
                           (tmp_path / "no_such_*.tar", "input pattern '{}' matches no file")):
        assert _run(["prepare", str(missing), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert words.format(missing) in err and "data.shards" not in err
    video = write_video(tmp_path / "one.mp4", pattern_video(8, 16, 16))
    assert _run(["prepare", str(video), "--out", str(tmp_path / "out")]) == 2
    assert "is one video file" in capsys.readouterr().err


def test_prepare_with_no_good_input_exits_2(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    _bad_inputs(videos)
    assert _run(["prepare", str(videos), "--out", str(tmp_path / "out"), "--num-frames", "4",
                 "--height", "8", "--width", "8"]) == 2
    captured = capsys.readouterr()
    assert "no input of" in captured.err and "3 skipped" in captured.err
    assert not list((tmp_path / "out").glob("*.tar"))
