"""TensorBoard and W&B loggers: what is written reads back (TensorBoard's own event reader; the real
wandb offline, read back with wandb's own reader of its transaction log), the video filmstrip layout,
W&B calls through a stand-in module, off by default. No network and no W&B account anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

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


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """The real wandb package, offline: no account, no network, every file under tmp_path.

    WANDB_MODE=offline keeps wandb from uploading; the base URL points at a closed port on this
    machine, so anything that still tried the network would fail at once instead of waiting. Git and
    code capture and error reporting (which sends crash reports) are off. The service wandb starts is
    torn down after the test, so no process is left behind."""
    wandb = pytest.importorskip("wandb", reason="needs wandb (the logging extra: pip install wandb==0.31.0)")
    for name in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_ENTITY", "WANDB_PROJECT",
                 "WANDB_NAME", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_NOTES", "WANDB_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "60")  # a service that cannot start fails the test, not hangs it
    for name, sub in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                      ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(name, str(home / sub))
    yield wandb
    wandb.teardown()


def _inspect(run_dir: Path, *options: str) -> str:
    """wandb's own reader of the one offline run's .wandb transaction log under RUN_DIR/wandb (offline
    wandb writes no wandb-summary.json, and the Python reader of older wandb versions is gone)."""
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *options, str(log)],
                          capture_output=True, text=True, timeout=120, check=True).stdout


def _wandb_records(run_dir: Path) -> list[dict]:
    """The run's records, in order (one JSON object each: type, and the record under that name)."""
    return [json.loads(line) for line in _inspect(run_dir).splitlines() if line.strip()]


def _wandb_summary(run_dir: Path) -> dict:
    """The run's state, config and summary (the last value of each key), as wandb reads them."""
    return json.loads(_inspect(run_dir, "--summary"))


def _history(records: list[dict]) -> dict[int, dict]:
    """step -> the values logged at that step (wandb's own keys, starting with '_', left out). The
    transaction log stores an image flattened, as '<key>.path', '<key>.width', ..."""
    rows: dict[int, dict] = {}
    for record in records:
        if record["type"] == "history":
            item = record["history"]["item"]
            rows.setdefault(int(item["_step"]), {}).update(
                {key: value for key, value in item.items() if not key.startswith("_")})
    return rows


def _image(run_dir: Path, row: dict, key: str) -> np.ndarray:
    """The pixels of the image a history row logged as `key` (a PNG in the run's files/)."""
    from PIL import Image

    assert row[f"{key}._type"] == "image-file" and row[f"{key}.format"] == "png"
    (files,) = (run_dir / "wandb").glob("offline-run-*/files")
    image = np.asarray(Image.open(files / row[f"{key}.path"]).convert("RGB"))
    assert image.shape[:2] == (row[f"{key}.height"], row[f"{key}.width"])
    return image


def test_wandb_offline_real_package(tmp_path, offline_wandb):
    """The real WandbLogger offline, used as the trainer uses it (metrics each step, before/after
    filmstrips, finish): what wandb wrote reads back with the values, steps and pixels logged."""
    loggers = build_loggers(tmp_path, wandb_project="ddrl-test", name="run1", config={"algo": {"beta": 0.5}})
    loggers.log_videos("samples/before", _videos(), 0)
    for step in (1, 2, 3):
        loggers.log_metrics({"loss": 1.0 / step, "reward_mean": 0.1 * step, "note": "text",
                             "nan": float("nan")}, step)
    after = _videos().flip(0)
    loggers.log_videos("samples/after", after, 3)
    loggers.close()
    records = _wandb_records(tmp_path)
    (run,) = [record["run"] for record in records if record["type"] == "run"]
    assert run["project"] == "ddrl-test" and run["display_name"] == "run1"
    assert run["config"]["update"]["algo"] == {"beta": 0.5}
    assert [record["exit"]["exit_code"] for record in records if record["type"] == "exit"] == [0]
    history = _history(records)
    assert sorted(history) == [0, 1, 2, 3]
    for step in (1, 2, 3):  # only the finite numbers: no "note", no "nan"
        assert {key: history[step][key] for key in ("loss", "reward_mean")} == {
            "loss": 1.0 / step, "reward_mean": 0.1 * step}
        assert not {"note", "nan"} & history[step].keys()
    assert np.array_equal(_image(tmp_path, history[0], "samples/before"), filmstrip(_videos()))
    assert np.array_equal(_image(tmp_path, history[3], "samples/after"), filmstrip(after))
    assert (history[3]["samples/after.height"], history[3]["samples/after.width"]) == (8, 15)
    summary = _wandb_summary(tmp_path)
    assert summary["state"] == "finished" and summary["summary"]["loss"] == 1 / 3
    assert summary["summary"]["samples/after"]["path"] == history[3]["samples/after.path"]


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


def test_a_run_with_wandb_offline_logs_its_metrics(tiny_overrides, offline_wandb):
    """`ddrl train ... train.wandb_project=P` (offline): every step's metrics.jsonl numbers are in
    the W&B history at that step, the last step's are the run's summary, and the before/after
    filmstrips are the evaluation videos."""
    from ddrl_scale.config import load_config
    from ddrl_scale.train.run import run_training

    config = load_config(None, [*tiny_overrides, "train.wandb_project=ddrl-test", "run.name=wandb-run"])
    run_training(config)
    run_dir = Path(config.run.output_dir)
    records = _wandb_records(run_dir)
    (run,) = [record["run"] for record in records if record["type"] == "run"]
    assert run["display_name"] == "wandb-run" and run["config"]["update"]["train"]["steps"] == 3
    history = _history(records)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics] == [1, 2, 3]
    assert sorted(history) == [0, 1, 2, 3]
    for record in metrics:
        logged = scalars(record)
        assert {"loss", "reward_mean", "data_loss"} <= logged.keys()
        assert {key: history[record["step"]].get(key) for key in logged} == logged, record["step"]
        assert not {key for key in history[record["step"]] if "." not in key} - logged.keys()
    summary = _wandb_summary(run_dir)
    assert summary["state"] == "finished" and summary["step"] == 3
    last = scalars(metrics[-1])
    assert {key: summary["summary"].get(key) for key in last} == last
    before = load_file(str(run_dir / "eval_before_videos.safetensors"))["videos"]
    assert np.array_equal(_image(run_dir, history[0], "samples/before"), filmstrip(before))
    assert _image(run_dir, history[3], "samples/after").shape == filmstrip(before).shape
