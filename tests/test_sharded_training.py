"""DDRL on the sharded anchor loader (data.split=sharded): a 2-rank FSDP2 run with a loader
worker per rank, stopped after its step-2 checkpoint and resumed, equals the uninterrupted run
exactly (same topology: the loader continues with exactly the next unseen samples)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import _TINY
from test_distributed import LOSS_KEYS, _metrics, _run

from ddrl_scale.config import load_config
from ddrl_scale.train.anchor_data import demo_shards

SHARDED = ["data.split=sharded", "data.num_workers=1", "parallel.engine=fsdp2", "train.eval_prompts=0",
           "train.steps=4", "train.save_every=2", "train.resume=auto", "algo.prompts_per_step=2"]


@pytest.fixture(scope="module")
def base(shared_shards_dir: Path) -> list[str]:
    overrides = [*_TINY, *SHARDED, f"data.generated_dir={shared_shards_dir}"]
    demo_shards(load_config(None, overrides))
    return overrides


def test_sharded_loader_run_resumes_exactly(base: list[str], tmp_path: Path):
    full = tmp_path / "full"
    _run([*base, f"run.output_dir={full}"], 2, tmp_path / "full.log")
    resumed = tmp_path / "resumed"
    _run([*base, "train.steps=2", f"run.output_dir={resumed}"], 2, tmp_path / "first.log")
    _, output = _run([*base, f"run.output_dir={resumed}"], 2, tmp_path / "second.log")
    assert re.search(r"resumed from \S*step_000002 at step 2", output), output[-4000:]
    got, want = _metrics(resumed), _metrics(full)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert {k: got[step][k] for k in LOSS_KEYS} == {k: want[step][k] for k in LOSS_KEYS}, step
        assert got[step]["anchor_samples_skipped"] == 0


def test_prepared_shards_with_caption_embeddings_need_no_text_encoder(tmp_path: Path, tiny_overrides,
                                                                      monkeypatch: pytest.MonkeyPatch):
    """mp4 -> `prepare` with a text encoder -> data.split=sharded: a DDRL step conditions the data
    term and the rollouts on the shards' embeddings, never calling the run's text encoder."""
    import math

    from test_data_prepare import make_videos

    from ddrl_scale.data.prepare import PrepareSettings, prepare
    from ddrl_scale.train.trainer import Trainer

    make_videos(tmp_path / "videos", 4)
    settings = PrepareSettings(num_frames=4, height=8, width=8, samples_per_shard=2,
                               text_encoder="hash:8:12")  # the tiny model's text_dim, tokens
    prepare(str(tmp_path / "videos"), tmp_path / "anchor", settings)
    config = load_config(None, [*tiny_overrides, f"data.shards={tmp_path / 'anchor'}",
                                "data.split=sharded", "data.buckets=[[3,4,8,8]]", "train.steps=1"])
    trainer = Trainer(config)

    def refuse(*_):
        raise AssertionError("the run's text encoder was called despite precomputed embeddings")

    monkeypatch.setattr(trainer.text_encoder, "encode", refuse)
    metrics = trainer.iteration()
    assert math.isfinite(metrics["loss"]) and metrics["data_loss"] > 0
    trainer.loader.close()
