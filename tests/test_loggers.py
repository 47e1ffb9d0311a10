"""TensorBoard and W&B loggers: what is written reads back (TensorBoard's own event reader), the
video filmstrip layout, W&B through a stand-in module (no network, no account), off by default."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ddrl_scale.train.loggers import RunLoggers, build_loggers, filmstrip, scalars


def _videos() -> torch.Tensor:
    """(2, 3, 3, 4, 5): sample n, frame t has value (n * 3 + t) / 10 in every pixel, channel c adds c/100."""
    values = torch.arange(6, dtype=torch.float32).reshape(2, 1, 3, 1, 1) / 10
    return (values + torch.arange(3).reshape(1, 3, 1, 1, 1) / 100).expand(2, 3, 3, 4, 5).contiguous()


def test_filmstrip_layout():
    image = filmstrip(_videos())
    assert image.shape == (2 * 4, 3 * 5, 3) and image.dtype == np.uint8
    for sample in range(2):
        for frame in range(3):
            tile = image[sample * 4:(sample + 1) * 4, frame * 5:(frame + 1) * 5]
            expected = [round(((sample * 3 + frame) / 10 + c / 100) * 255) for c in range(3)]
            assert (tile == np.array(expected, dtype=np.uint8)).all(), (sample, frame)
    with pytest.raises(ValueError, match=r"\(N, 3, T, H, W\)"):
        filmstrip(torch.zeros(2, 3, 4, 5))


def test_scalars_keeps_finite_numbers_only():
    got = scalars({"loss": 0.5, "step": 3, "nan": float("nan"), "name": "x", "flag": True, "list": [1]})
    assert got == {"loss": 0.5, "step": 3.0}


def test_off_by_default(tmp_path):
    loggers = build_loggers(tmp_path)
    assert loggers.loggers == []
    loggers.log_metrics({"loss": 1.0}, 1)
    loggers.close()
    assert not (tmp_path / "tensorboard").exists()
    assert build_loggers(tmp_path, tensorboard=True, is_main=False).loggers == []


def test_tensorboard_scalars_and_videos_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = build_loggers(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        loggers.log_metrics({"loss": 1.0 / step, "reward_mean": 0.1 * step, "note": "text"}, step)
    loggers.log_videos("samples/before", _videos(), 0)
    loggers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "reward_mean"]
    loss = [(event.step, event.value) for event in events.Scalars("loss")]
    assert loss == [(1, pytest.approx(1.0)), (2, pytest.approx(0.5)), (3, pytest.approx(1 / 3))]
    (image,) = events.Images("samples/before")
    assert (image.step, image.height, image.width) == (0, 8, 15)


class _StandInWandb(types.ModuleType):
    """Records what a real wandb would be asked to do."""

    def __init__(self):
        super().__init__("wandb")
        self.calls: list[tuple] = []
        outer = self

        class Run:
            def log(self, data, step=None):
                outer.calls.append(("log", data, step))

            def finish(self):
                outer.calls.append(("finish",))

        class Image:
            def __init__(self, array):
                self.array = array

        self.Image = Image
        self._run = Run()

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self._run


def test_wandb_calls_through_a_stand_in(tmp_path, monkeypatch):
    stand_in = _StandInWandb()
    monkeypatch.setitem(sys.modules, "wandb", stand_in)
    loggers = build_loggers(tmp_path, wandb_project="ddrl-test", name="run1", config={"a": 1})
    loggers.log_metrics({"loss": 0.25, "note": "text"}, 4)
    loggers.log_videos("samples/after", _videos(), 4)
    loggers.close()
    (kind, init), log_metrics, log_video, finish = stand_in.calls
    assert kind == "init" and init["project"] == "ddrl-test" and init["name"] == "run1"
    assert init["config"] == {"a": 1} and init["dir"] == str(tmp_path)
    assert log_metrics == ("log", {"loss": 0.25}, 4)
    assert log_video[2] == 4 and log_video[1]["samples/after"].array.shape == (8, 15, 3)
    assert finish == ("finish",)


def test_wandb_offline_real_package(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb package is not installed here (the stand-in test "
                                        "covers the calls); install wandb to run this offline")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = build_loggers(tmp_path, wandb_project="ddrl-test")
    loggers.log_metrics({"loss": 0.5}, 1)
    loggers.log_videos("samples/after", _videos(), 1)
    loggers.close()
    assert any((tmp_path / "wandb").glob("offline-run-*"))


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="train.wandb_project='p' needs the 'wandb' package"):
        build_loggers(tmp_path, wandb_project="p")


def test_fan_out_order():
    seen = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def log_metrics(self, metrics, step):
            seen.append((self.name, step))

        def log_videos(self, tag, videos, step):
            seen.append((self.name, tag))

        def close(self):
            seen.append((self.name, "closed"))

    loggers = RunLoggers([Recorder("a"), Recorder("b")])
    loggers.log_metrics({}, 7)
    loggers.log_videos("t", _videos(), 7)
    loggers.close()
    assert seen == [("a", 7), ("b", 7), ("a", "t"), ("b", "t"), ("a", "closed"), ("b", "closed")]


def test_a_run_with_tensorboard_writes_scalars_and_samples(tiny_overrides):
    """`ddrl train ... train.tensorboard=true`: the run's metrics and before/after samples land in
    RUN_DIR/tensorboard."""
    pytest.importorskip("tensorboard", reason="needs tensorboard (the logging extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ddrl_scale.config import load_config
    from ddrl_scale.train.run import run_training

    config = load_config(None, [*tiny_overrides, "train.tensorboard=true"])
    run_training(config)
    events = EventAccumulator(str(Path(config.run.output_dir) / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"loss", "reward_mean", "time_step"} <= set(tags["scalars"]), tags["scalars"]
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3]
    assert {"samples/before", "samples/after"} <= set(tags["images"]), tags["images"]
