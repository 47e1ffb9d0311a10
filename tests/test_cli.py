"""Tests for the `ddrl` console entry: config errors exit 2 with the key named, before any work."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _ddrl(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """The finished command and the CPU seconds it used: unlike its wall time, they do not grow
    when other jobs share the machine, so "it stopped before any work" is checked without flakes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = _cpu_seconds()
    result = subprocess.run([sys.executable, "-m", "ddrl_scale.cli", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    return result, _cpu_seconds() - start


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
    assert seconds < 20  # CPU seconds: imports, no model, data or rollout
    assert not run_dir.exists() and not shards_dir.exists()


def test_demo_config_error_exits_2(tmp_path):
    """`ddrl demo <misspelt key>` (no YAML) also exits 2 naming the key before any work."""
    run_dir = tmp_path / "run"
    result, seconds = _ddrl("demo", f"run.output_dir={run_dir}", "algo.grup_size=4")
    assert result.returncode == 2, result.stderr
    assert "algo.grup_size" in result.stderr
    assert seconds < 20  # CPU seconds: imports, no model, data or rollout
    assert not run_dir.exists()


# -- a device or backend this host lacks: one line, exit 2, before anything is built ------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the host has a GPU")
@pytest.mark.parametrize(("override", "named"), [
    ("run.device=cuda", "run.device=cuda"),
    ("kernels.backend=cuda", "kernels.backend='cuda'"),
    ("model.attention_backend=flash", "model.attention_backend=flash"),
])
def test_a_missing_gpu_or_backend_is_one_line_exit_2(tmp_path, config_path, override, named):
    run_dir, shards_dir = tmp_path / "run", tmp_path / "shards"
    result, _ = _ddrl("train", str(config_path), f"run.output_dir={run_dir}",
                      f"data.generated_dir={shards_dir}", override)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("ddrl: error:")]
    assert len(lines) == 1 and named in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not run_dir.exists() and not shards_dir.exists()


def test_host_checks_name_a_missing_engine_package_and_too_few_gpus(monkeypatch):
    from ddrl_scale.config import load_config
    from ddrl_scale.train import host_checks

    monkeypatch.setattr(host_checks, "_installed", lambda module: False)
    with pytest.raises(host_checks.HostCapabilityError, match=r"parallel.engine=deepspeed needs the "
                                                              r"deepspeed package.*\[deepspeed\]"):
        host_checks.check_host(load_config(None, ["parallel.engine=deepspeed", "run.device=cpu"]))
    monkeypatch.setattr(host_checks.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_checks.torch.cuda, "device_count", lambda: 2)
    with pytest.raises(host_checks.HostCapabilityError, match="local rank 2 needs GPU 2.*2 visible GPUs"):
        host_checks.run_device("cuda", local_rank=2)


# -- messages ---------------------------------------------------------------------------------------
def test_an_unknown_flag_after_train_prints_trains_usage(capsys):
    from ddrl_scale.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["train", "configs/demo_cpu.yaml", "--unknown"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ddrl train ") and "unrecognized arguments: --unknown" in err


def test_bench_help_is_for_users_not_the_module_docstring(capsys):
    import ddrl_scale.bench
    from ddrl_scale.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "--compare" in out and "benchmark suite" in out
    docstring = ddrl_scale.bench.__doc__
    internal = [line.strip() for line in docstring.splitlines() if len(line.strip()) > 30]
    assert not any(line in out for line in internal)
