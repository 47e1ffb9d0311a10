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
