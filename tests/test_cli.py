"""Tests for the `ddrl` console entry: config errors exit 2 with the key named, before any work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "configs" / "demo_cpu.yaml"


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """configs/demo_cpu.yaml, or a small stand-in YAML while that file does not exist."""
    if DEMO_YAML.is_file():
        return DEMO_YAML
    path = tmp_path / "demo.yaml"
    path.write_text("optim:\n  lr: 3.0e-4\ntrain:\n  steps: 40\n")
    return path


def _ddrl(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "ddrl_scale.cli", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - start


@pytest.mark.parametrize(("bad", "key"), [("optim.lr=abc", "optim.lr"), ("optim.lrr=1", "optim.lrr")])
def test_train_config_error_exits_2_fast(tmp_path, config_path, bad, key):
    """`ddrl train CFG <bad override>` exits 2 naming the key, quickly, with no run dir or data made."""
    run_dir, shards_dir = tmp_path / "run", tmp_path / "shards"
    result, seconds = _ddrl("train", str(config_path), f"run.output_dir={run_dir}",
                            f"data.generated_dir={shards_dir}", bad)
    assert result.returncode == 2, result.stderr
    assert key in result.stderr
    assert result.stderr.startswith("ddrl: error:")
    assert "Traceback" not in result.stderr
    assert seconds < 20
    assert not run_dir.exists() and not shards_dir.exists()


def test_demo_config_error_exits_2(tmp_path):
    """`ddrl demo <misspelt key>` (no YAML) also exits 2 naming the key before any work."""
    run_dir = tmp_path / "run"
    result, seconds = _ddrl("demo", f"run.output_dir={run_dir}", "algo.grup_size=4")
    assert result.returncode == 2, result.stderr
    assert "algo.grup_size" in result.stderr
    assert seconds < 20
    assert not run_dir.exists()
