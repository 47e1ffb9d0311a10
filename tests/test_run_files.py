"""Run files survive torn writes (storage/run_files.py), and config mistakes end with a named error.

A torn last line of metrics.jsonl (the process died inside a write, or the disk filled) is dropped
with a warning on resume; the steps stay 1..N with no gap or repeat. Config mistakes found only
with the job's size (check_run_plan) exit 2 with `config key '...'` and no traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ddrl_scale.cli import main
from ddrl_scale.config import ConfigError, load_config
from ddrl_scale.config.schema import check_run_plan
from ddrl_scale.storage.run_files import atomic_write_text, read_jsonl
from ddrl_scale.train.metrics import MetricsWriter, read_metrics
from ddrl_scale.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "reward_me')
    with caplog.at_level(logging.WARNING, logger="ddrl_scale.storage.run_files"):
        assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert "torn last line 3" in caplog.text and str(path) in caplog.text
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=re.escape(f"'{path}' line 2 is not valid JSON")):
        read_jsonl(path)


def test_metrics_writer_rewrites_atomically(tmp_path, monkeypatch):
    """The resume rewrite goes through a temporary file: a crash inside it leaves the old file."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step}) + "\n" for step in (1, 2, 3)))

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        MetricsWriter(path, resume_step=2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary left behind
    monkeypatch.undo()
    MetricsWriter(path, resume_step=2).close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    atomic_write_text(tmp_path / "x.txt", "whole")
    assert (tmp_path / "x.txt").read_text() == "whole"


def test_torn_metrics_line_resumes_with_a_warning(tiny_overrides, tmp_path, caplog):
    """Killed while writing step 3's line (after the step-2 checkpoint): the resumed run warns,
    redoes step 3 and logs steps [1, 2, 3, 4] exactly once each."""
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides, "train.eval_prompts=0", "train.save_every=1", "train.keep_last=10"]
    Trainer(load_config(None, [*overrides, "train.steps=2"])).train()
    metrics = run_dir / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 3, "reward_mean": 0.4')  # the torn write
    trainer = Trainer(load_config(None, [*overrides, "train.steps=4"]))
    trainer.maybe_resume()
    with caplog.at_level(logging.WARNING, logger="ddrl_scale.storage.run_files"):
        trainer.train()
    assert "torn last line" in caplog.text
    assert [record["step"] for record in read_metrics(metrics)] == [1, 2, 3, 4]


# -- named config errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "key"), [
    ("parallel.cp=4", "parallel.cp"),
    ("parallel.dp_replicate=3", "parallel.dp_replicate"),
    ("rewards=[{name: shininess, weight: 1.0}]", "rewards.0.name"),
])
def test_run_plan_errors_name_the_key(override, key):
    config = load_config(None, ["parallel.engine=fsdp2", override])
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}'")) as caught:
        check_run_plan(config, world_size=2)
    if key.startswith("rewards"):
        assert "caption_alignment" in str(caught.value)  # the registered ones are listed


@pytest.mark.parametrize(("override", "key"), [
    ("model.num_heads=0", "model.num_heads"),
    ("parallel.cp=2", "parallel.cp"),  # larger than the world of 1
    ("parallel.dp_replicate=2", "parallel.dp_replicate"),
    ("rewards=[{name: shininess, weight: 1.0}]", "rewards.0.name"),
])
def test_config_mistakes_exit_2_without_traceback(tiny_overrides, capsys, override, key):
    status = main(["demo", *tiny_overrides, "parallel.engine=fsdp2", override])
    err = capsys.readouterr().err
    assert status == 2 and f"config key '{key}'" in err and "Traceback" not in err, err


def test_config_mistake_is_printed_by_one_rank(tiny_overrides, tmp_path):
    """Under torchrun with 2 ranks, parallel.cp=4: exit 2, the error once, no traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               "--nproc_per_node=2", "-m", "ddrl_scale.cli", "demo", *tiny_overrides,
               "parallel.engine=fsdp2", "parallel.cp=4"]
    done = subprocess.run(command, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-4000:]
    # torchrun reports the failed workers with a traceback of its own; none comes from our code
    assert output.count("config key 'parallel.cp'") == 1, output[-4000:]
    assert str(REPO / "ddrl_scale") not in output, output[-4000:]
