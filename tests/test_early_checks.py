"""The checks made before the expensive part of a run (train/early_checks.py; issue 24 item 2):
each mistake stops `ddrl train` with one line naming the key, before a model is built."""

from __future__ import annotations

import pytest

from ddrl_scale import cli
from ddrl_scale.config import ConfigError, load_config
from ddrl_scale.data.prepare import PrepareSettings, prepare
from ddrl_scale.data.video_io import write_video
from ddrl_scale.train import early_checks

np = pytest.importorskip("numpy")


def _videos(folder, count: int = 3):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        write_video(folder / f"clip{index}.mp4", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
        (folder / f"clip{index}.txt").write_text(f"clip {index}")
    return folder


@pytest.fixture(scope="module")
def shards_16(tmp_path_factory):
    """Shards prepared at 4 frames of 16 x 16 (pixel VAE: latents 3x4x16x16); the tiny run is 3x4x8x8."""
    root = tmp_path_factory.mktemp("early")
    out = root / "anchor16"
    prepare(str(_videos(root / "videos")), out, PrepareSettings(num_frames=4, height=16, width=16))
    return out


def _never(*args, **kwargs):
    raise AssertionError("built before the early checks stopped the run")


def test_shards_of_another_size_stop_train_before_any_model(shards_16, tiny_overrides, monkeypatch, capsys):
    """Acceptance: exit 2, one line naming data.shards and video.* and both fixes, no model built."""
    from ddrl_scale.train import trainer

    for name in ("build_model", "build_text_encoder", "build_vae", "build_engine", "build_loader"):
        monkeypatch.setattr(trainer, name, _never)
    monkeypatch.delenv("RANK", raising=False)
    code = cli.main(["train", "configs/demo_cpu.yaml", *tiny_overrides, f"data.shards={shards_16}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"ddrl: error: data.shards '{shards_16}' hold latents of shape 3x4x16x16 in 3 of "
                          "3 samples (prepared with --num-frames 4 --height 16 --width 16 --vae pixel), "
                          "but video.* asks for 3x4x8x8")
    assert "set video.channels=3 video.num_frames=4 video.height=16 video.width=16" in err
    assert "or prepare them again with --num-frames 4 --height 8 --width 8" in err


def test_matching_shards_pass_and_buckets_are_named(shards_16, tiny_overrides):
    early_checks.check_anchor_shards(load_config(None, [
        *tiny_overrides, f"data.shards={shards_16}", "video.height=16", "video.width=16"]))
    config = load_config(None, [*tiny_overrides, f"data.shards={shards_16}", "data.split=sharded",
                                "data.buckets=[[3,4,8,8],[3,2,8,8]]"])
    with pytest.raises(ConfigError, match=r"outside data.buckets \[\[3, 4, 8, 8\], \[3, 2, 8, 8\]\]"):
        early_checks.check_anchor_shards(config)
    early_checks.check_anchor_shards(load_config(None, [
        *tiny_overrides, f"data.shards={shards_16}", "data.split=sharded", "data.buckets=[[3,4,16,16]]"]))


def test_shards_missing_from_the_given_index_are_named(shards_16, tmp_path, tiny_overrides):
    other = tmp_path / "other"
    prepare(str(_videos(tmp_path / "videos", 1)), other, PrepareSettings(num_frames=4, height=8, width=8))
    (other / "part-000000.tar").rename(other / "part-000007.tar")
    config = load_config(None, [*tiny_overrides, f"data.shards={other}",
                                f"data.index={shards_16 / 'index.json'}"])
    with pytest.raises(ConfigError, match="data.shards: shard 'part-000007.tar' is not listed in the index"):
        early_checks.check_anchor_shards(config)


@pytest.mark.parametrize("params,stored,wanted,flags", [
    # pixel VAE: latents are the pixels
    ({"num_frames": 8, "height": 16, "width": 16}, (3, 8, 16, 16), (3, 4, 8, 8),
     "--num-frames 4 --height 8 --width 8"),
    # patch:2: half the height and width
    ({"num_frames": 4, "height": 16, "width": 16}, (12, 4, 8, 8), (12, 4, 4, 6),
     "--num-frames 4 --height 8 --width 12"),
    # the Wan VAE: 4x in time (causal: 1 + 4 (T - 1) frames), 8x in space
    ({"num_frames": 81, "height": 480, "width": 832}, (16, 21, 60, 104), (16, 11, 30, 52),
     "--num-frames 41 --height 240 --width 416"),
    # another channel count needs another VAE: no flags to give
    ({"num_frames": 8, "height": 16, "width": 16}, (3, 8, 16, 16), (16, 8, 16, 16), None),
])
def test_prepare_flags_follow_the_vae_compression(params, stored, wanted, flags):
    assert early_checks.prepare_flags_for(params, stored, wanted) == flags


def test_resume_of_a_run_folder_names_its_latest_checkpoint(tmp_path, tiny_overrides):
    run = tmp_path / "old_run"
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
        (run / "checkpoints" / f"step_{step:06d}" / "trainer_state.pt").write_bytes(b"")
    for given in (run, run / "checkpoints"):
        config = load_config(None, [*tiny_overrides, f"train.resume={given}"])
        with pytest.raises(ConfigError, match=rf"train.resume: '{given}' is not a checkpoint folder .*"
                                              rf"latest checkpoint is '{run}/checkpoints/step_000004'"):
            early_checks.check_resume(config)
    early_checks.check_resume(load_config(None, [*tiny_overrides,
                                                 f"train.resume={run}/checkpoints/step_000002"]))
    with pytest.raises(ConfigError, match="train.resume: checkpoint folder '.*nowhere' does not exist"):
        early_checks.check_resume(load_config(None, [*tiny_overrides, f"train.resume={tmp_path}/nowhere"]))


def test_missing_reward_and_model_files_are_named(tmp_path, tiny_overrides):
    present = tmp_path / "scorer.safetensors"
    present.write_bytes(b"x")
    rewards = (f"rewards=[{{name: brightness, weight: 1.0, args: {{url: 'http://host/x', mode: fast, "
               f"model_path: '{present}'}}}}, "
               f"{{name: saturation, weight: 1.0, args: {{path: '{tmp_path}/no'}}}}]")
    with pytest.raises(ConfigError, match=rf"rewards.1.args.path: '{tmp_path}/no' does not exist \(the "
                                          "saturation reward's model files"):
        early_checks.check_input_paths(load_config(None, [*tiny_overrides, rewards]))
    with pytest.raises(ConfigError, match="model.init_checkpoint: '.*missing.safetensors' does not exist"):
        early_checks.check_input_paths(load_config(None, [
            *tiny_overrides, f"model.init_checkpoint={tmp_path}/missing.safetensors"]))
    with pytest.raises(ConfigError, match="model.pretrained: '.*no_wan' is not a folder"):
        early_checks.check_input_paths(load_config(None, [
            *tiny_overrides, "model.kind=diffusers_wan", f"model.pretrained={tmp_path}/no_wan"]))
    early_checks.check_input_paths(load_config(None, tiny_overrides))  # builtin/none: nothing to check


def test_more_processes_than_gpus_on_a_node(tiny_overrides, monkeypatch):
    import torch

    config = load_config(None, [*tiny_overrides, "run.device=cuda"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="this node starts 4 processes .* but sees 2 GPUs"):
        early_checks.check_node_gpus(config)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    early_checks.check_node_gpus(config)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    early_checks.check_node_gpus(load_config(None, tiny_overrides))  # run.device=cpu: no GPU needed
